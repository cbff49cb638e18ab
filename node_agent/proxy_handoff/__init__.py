"""How a pod reaches the proxy: the agent hands each enrolled pod's netns to it.

`protocol` is the wire format; `agent_side` is the server the node agent
runs; `proxy_side` is the client the node proxy runs.
"""
