"""Enrollment: from a CNI ADD to a captured pod the proxy serves, and back.

`registry` is what the agent remembers across restarts; `reconcile` decides
what to do when that memory and the kernel disagree.
"""
