"""What podnet reads from inside a pod's netns over netlink."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from node_agent.netns import run
from node_agent.redirect.podnet import pod_addresses

pytestmark = pytest.mark.netns


def test_pod_addresses_are_the_global_ones_of_every_family(topology):
    node = topology.add_node("a", "10.244.1.0/24", "fd42:244:1::/64")
    dual = topology.add_pod(node, "dual", dual_stack=True)
    v4_only = topology.add_pod(node, "v4")

    # Loopback (host scope) and fe80:: (link scope) are not addresses peers dial.
    assert sorted(pod_addresses(dual.netns), key=str) == sorted([dual.ipv4, dual.ipv6], key=str)
    assert pod_addresses(v4_only.netns) == [v4_only.ipv4]
    # Every link counts, not only eth0; the node has its uplink and the pods' bridge.
    assert set(pod_addresses(node.netns)) == {
        node.underlay_ipv4,
        node.underlay_ipv6,
        next(node.pod_cidr_v4.hosts()),
        next(node.pod_cidr_v6.hosts()),
    }
    # A point-to-point address is the pod's own end (IFA_LOCAL), not the peer's.
    run(dual.netns, ["ip", "addr", "add", "192.0.2.1", "peer", "192.0.2.2", "dev", "eth0"])
    assert IPv4Address("192.0.2.1") in pod_addresses(dual.netns)
    assert IPv4Address("192.0.2.2") not in pod_addresses(dual.netns)
