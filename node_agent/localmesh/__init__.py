"""Nodes and pods as network namespaces, wired by real CNI plugins as on a Kubernetes node.

`topology` builds nodes, pods and the underlay that joins them (the entry
point); `wiring` makes their namespaces, links, addresses and routes over
netlink; `conflists` writes a node's CNI config and `cni_runtime` runs it as a
container runtime does; `sockets` opens TCP sockets inside a netns; `sweep`
removes what a crashed run left; `traffic` shows where connections land.
`mesh` adds the control plane, agents and proxies. Tests and `weir demo` use
them; nothing here runs on a production node.
"""
