"""Weir's chained CNI plugin: hands each pod to the node agent."""
