"""Weir node agent: per-node capture, enrollment and the debugging surface."""
