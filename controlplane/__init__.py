"""Weir control plane: mesh config over delta xDS, and the workload CA."""
