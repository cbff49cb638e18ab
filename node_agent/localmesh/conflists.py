"""The conflist a node's container runtime finds in /etc/cni/net.d."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Final

# The newest spec version Debian 12's containernetworking-plugins (1.1.1) speak.
CONFLIST_CNI_VERSION: Final = "1.0.0"


def node_conflist(
    *,
    network: str,
    bridge: str,
    pod_cidr_v4: IPv4Network,
    pod_cidr_v6: IPv6Network | None,
    ipam_data_dir: Path,
    chained_plugins: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Bridge and host-local for one node, then `chained_plugins` (tuning, weir-cni) in order.

    isGateway puts the pod gateway on the node's bridge, so the node routes
    pod traffic (and later, its capture sees it). ipMasq is off: pods must
    keep their own source address across nodes, as in a real cluster network.
    """
    ranges: list[list[dict[str, str]]] = [[{"subnet": str(pod_cidr_v4)}]]
    routes: list[dict[str, str]] = [{"dst": "0.0.0.0/0"}]
    if pod_cidr_v6 is not None:
        ranges.append([{"subnet": str(pod_cidr_v6)}])
        routes.append({"dst": "::/0"})
    primary = {
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "host-local",
            "dataDir": str(ipam_data_dir),
            "ranges": ranges,
            "routes": routes,
        },
    }
    return {
        "cniVersion": CONFLIST_CNI_VERSION,
        "name": network,
        "plugins": [primary, *(copy.deepcopy(dict(p)) for p in chained_plugins)],
    }
