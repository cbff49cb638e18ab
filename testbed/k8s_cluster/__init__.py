"""A real Kubernetes cluster in network namespaces on this machine (see cluster.py)."""
