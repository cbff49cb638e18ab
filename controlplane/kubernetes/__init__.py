"""Kubernetes mode: the API server as config source, node identity and CA store.

`translate` turns cached API objects into a MeshConfig (pure), `source`
lists and watches them, `tokenreview` authenticates nodes with projected
ServiceAccount tokens, `ca_store` keeps the mesh root in a Secret. See
docs/kubernetes.md for the contract and docs/controlplane.md for the design.
"""
