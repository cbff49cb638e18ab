"""Nodes and pods as network namespaces, wired by real CNI plugins as on a Kubernetes node.

`cni_runtime` does what a container runtime does with a conflist; `topology`
builds nodes, pods and the underlay that joins them. Tests and `weir demo`
use both; nothing here runs on a production node.
"""
