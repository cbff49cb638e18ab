"""Test and benchmark scaffolding: real runtimes and clusters built on this machine.

Not part of the Weir wheel: nothing here ships, and nothing in Weir imports it.
"""
