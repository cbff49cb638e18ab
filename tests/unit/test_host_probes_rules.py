"""The node's kubelet-probe SNAT rules and the pods' exemption for them, against golden files."""

from __future__ import annotations

import ipaddress

import pytest

from node_agent.constants import PROBE_SNAT_IPV4, PROBE_SNAT_IPV6
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.host_probes import (
    HOST_PROBES_CHAIN,
    host_probe_rules,
    ours,
    pod_ips,
)
from node_agent.redirect.iptables_model import owned_tables
from node_agent.redirect.iptables_plan import differences, reconcile_script
from node_agent.redirect.iptables_rules import INBOUND_CHAIN, capture_rules
from weir_common.errors import InvalidInputError

PODS = pod_ips(["10.244.1.7/24", "fd00:244:1::7/64", "10.244.1.12", "10.244.1.5/24"])

# A node as kube-proxy and the pods' own capture chains left it: WEIR-INBOUND
# here stands for any other Weir chain in the same netns, which the host
# probes must never touch.
NODE_NAT = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-POSTROUTING - [0:0]
:WEIR-INBOUND - [0:0]
{chain}
-A PREROUTING -p tcp -m comment --comment "weir/other" -j WEIR-INBOUND
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
{jumps}
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A WEIR-INBOUND -p tcp -j RETURN
{rules}
COMMIT
"""


def _node(ips: list[str], family: int = 4) -> str:
    table = host_probe_rules(pod_ips(ips), family)["nat"]  # type: ignore[arg-type]
    return NODE_NAT.format(
        chain=f":{HOST_PROBES_CHAIN} - [0:0]",
        jumps="\n".join(f"-A {c} {r}" for c, r in table.jumps),
        rules="\n".join(f"-A {HOST_PROBES_CHAIN} {r}" for r in table.chains[HOST_PROBES_CHAIN]),
    )


@pytest.mark.parametrize("family", [4, 6])
def test_fresh_install_matches_golden(golden, family):
    golden(
        f"iptables/host-probes-ipv{family}.txt",
        reconcile_script(host_probe_rules(PODS, family), {}),
    )


def test_one_snat_per_pod_ip_of_the_family_in_address_order():
    v4 = host_probe_rules(PODS, 4)["nat"].chains[HOST_PROBES_CHAIN]
    assert [r.split()[1] for r in v4] == ["10.244.1.5/32", "10.244.1.7/32", "10.244.1.12/32"]
    assert all(r.endswith(f"-j SNAT --to-source {PROBE_SNAT_IPV4}") for r in v4)
    [v6] = host_probe_rules(PODS, 6)["nat"].chains[HOST_PROBES_CHAIN]
    assert v6.startswith("-d fd00:244:1::7/128 ")
    assert v6.endswith(f"-j SNAT --to-source {PROBE_SNAT_IPV6}")


def test_only_sockets_of_the_node_itself_are_snated():
    [(chain, jump)] = host_probe_rules(PODS, 4)["nat"].jumps
    assert chain == "POSTROUTING"
    # Forwarded packets (pod to pod through the bridge) carry no local socket.
    assert jump.startswith("-p tcp -m owner --socket-exists ")


def test_duplicates_and_order_do_not_change_rules():
    again = pod_ips(["10.244.1.5", "10.244.1.12/24", "10.244.1.7", "10.244.1.5/24"])
    assert host_probe_rules(again, 4) == host_probe_rules(PODS, 4)


def test_no_pods_keeps_an_empty_chain_and_its_jump():
    table = host_probe_rules([], 4)["nat"]
    assert table.chains == {HOST_PROBES_CHAIN: ()}
    assert len(table.jumps) == 1


def test_rules_read_back_from_the_node_compare_equal():
    installed = ours(owned_tables(_node(["10.244.1.5/24", "10.244.1.7/24"])))
    desired = host_probe_rules(pod_ips(["10.244.1.7", "10.244.1.5"]), 4)
    assert installed == desired
    assert reconcile_script(desired, installed) == ""
    assert differences(desired, installed) == []


def test_a_departed_pod_loses_its_rule_and_nothing_else_moves(golden):
    installed = ours(owned_tables(_node(["10.244.1.5/24", "10.244.1.7/24"])))
    script = reconcile_script(host_probe_rules(pod_ips(["10.244.1.7"]), 4), installed)
    golden("iptables/host-probes-pod-departed-ipv4.txt", script)
    assert "-D POSTROUTING" not in script, "the jump was right; it must not move"
    assert "WEIR-INBOUND" not in script
    assert "KUBE" not in script


def test_removal_takes_only_the_host_probe_chain_and_jump(golden):
    installed = ours(owned_tables(_node(["10.244.1.5/24"])))
    script = reconcile_script({}, installed)
    golden("iptables/host-probes-remove-ipv4.txt", script)
    assert "WEIR-INBOUND" not in script
    assert "KUBE" not in script


def test_other_weir_chains_of_the_netns_are_not_ours():
    assert ours(owned_tables(NODE_NAT.format(chain="", jumps="", rules=""))) == {}


@pytest.mark.parametrize("bad", ["10.244.1", "pod-a", "10.244.1.5/33", ""])
def test_a_bad_pod_ip_is_refused_by_name(bad):
    with pytest.raises(InvalidInputError, match=f"pod IP {bad!r} is not an IP address"):
        pod_ips(["10.244.1.5", bad])


@pytest.mark.parametrize(("family", "source"), [(4, PROBE_SNAT_IPV4), (6, PROBE_SNAT_IPV6)])
@pytest.mark.parametrize(
    "config",
    [
        CaptureConfig(),
        CaptureConfig(include_inbound_ports=(8080,), exclude_inbound_ports=(9090,)),
    ],
    ids=["default", "include-inbound"],
)
def test_pods_let_the_probe_source_through_before_any_capture(family, source, config):
    rules = list(capture_rules(config, family)["nat"].chains[INBOUND_CHAIN])
    prefix = ipaddress.ip_address(source).max_prefixlen
    [exempt] = [i for i, r in enumerate(rules) if r.startswith(f"-s {source}/{prefix} ")]
    assert rules[exempt].endswith("-j RETURN")
    # The tunnel port's RETURN may precede it; every REDIRECT comes after.
    assert all("REDIRECT" not in r for r in rules[:exempt])
    assert any("REDIRECT" in r for r in rules[exempt:])
