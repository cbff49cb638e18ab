"""How packets are steered into the node proxy.

`config` says what a pod's capture should be; `iptables_*` turn that into
rules (pure) and put them in the pod's netns (thin adapter); `backend`
decides between iptables-nft and iptables-legacy.
"""
