"""How a pod reaches the agent from the CNI chain: the server end of weir-cni's socket.

`CniEventServer` accepts the plugin's requests (the protocol is documented in
cni_plugin/protocol.py) and hands each pod to a `CniEventHandler`; the node
agent plugs its enrollment in as that handler, tests plug in
`testbed.cni_fakes.RecordingHandler`.
"""
