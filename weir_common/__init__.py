"""What the control plane and the node both use.

The mesh's resource types and identities (mesh.py), the generated protobuf
code (_generated/, from protos/), the xDS framing both ends speak
(xds_transport.py), and small runtime pieces every daemon needs: errors an
operator can act on, supervised background tasks, rate-limited logs and the
Prometheus text format. This package imports nothing of controlplane,
node_agent or cni_plugin (import-linter checks it; see pyproject.toml).
"""
