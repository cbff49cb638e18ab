"""How weir-cni gets onto a node: the plugin binary, and its place in the CNI config.

`conflist` decides (pure), `installer` applies and watches, `cli` is
`weir cni install|uninstall`.
"""
