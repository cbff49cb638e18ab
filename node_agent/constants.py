"""Numbers every part of Weir must agree on.

Each value is a contract of docs/architecture.md; the comment names who else
depends on it, so a change here is a change there too.
"""

from typing import Final

# Proxy listeners, opened inside each captured pod's netns by the node proxy;
# the capture rules (iptables REDIRECT, eBPF connect4/sk_lookup) point at them.
OUTBOUND_CAPTURE_PORT: Final = 15001
INBOUND_PLAINTEXT_CAPTURE_PORT: Final = 15006
# HBONE (HTTP/2 CONNECT over mTLS); peers' proxies dial it, so capture never touches it.
INBOUND_TUNNEL_PORT: Final = 15008

ADMIN_PORT: Final = 15000  # loopback only
# The node proxy's own admin listener (loopback only); `weir node` reads it.
PROXY_ADMIN_PORT: Final = 15019
METRICS_PORT: Final = 15020
READINESS_PORT: Final = 15021

# The proxy runs as this UID/GID; capture exempts both so the proxy's own
# upstream connections are not redirected back into itself.
PROXY_UID: Final = 1337
PROXY_GID: Final = 1337

# The proxy sets SO_MARK on the sockets it opens in pod netns; capture exempts
# packets carrying it. Only the low 12 bits are ours: other tools (Cilium,
# kube-proxy, Calico) own other bits of the same 32-bit mark.
PROXY_MARK: Final = 0x539
PROXY_MARK_MASK: Final = 0xFFF

# Every iptables chain Weir creates starts with this; cleanup and drift
# detection find our chains by it and never touch anything else.
CHAIN_PREFIX: Final = "WEIR-"
# Every rule carries `-m comment --comment "weir/<purpose>"`.
RULE_COMMENT_PREFIX: Final = "weir/"

# The node SNATs its own TCP connections to enrolled pods (kubelet probes) to
# this link-local source, and pod capture (iptables WEIR-INBOUND, eBPF
# sk_lookup) lets connections from it through to the app. The values are
# Istio ambient's: nothing on a node uses them, 169.254.0.0/16 is never routed
# off a link, and an operator running both meshes side by side gets one
# meaning for them. docs/kubernetes.md "Kubelet probes" has the trust argument.
PROBE_SNAT_IPV4: Final = "169.254.7.127"
PROBE_SNAT_IPV6: Final = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
