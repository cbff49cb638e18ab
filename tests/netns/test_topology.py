"""The local topology: real bridge/host-local/tuning plugins, real sockets, real cleanup."""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from node_agent.localmesh import wiring
from node_agent.localmesh.cni_runtime import CniPluginError, invoke_chain
from node_agent.localmesh.sweep import sweep
from node_agent.localmesh.topology import LocalTopology, Node, Pod
from node_agent.netns import Netns, run
from weir_common.errors import InvalidInputError, NodeSetupError

pytestmark = pytest.mark.netns

UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH)


def echo_once(server: Pod, client: Pod, *, ipv6: bool = False) -> str:
    """Connect `client` to a listener in `server`; return the peer address the server saw."""
    listener = server.listen(ipv6=ipv6)
    seen: list[str] = []

    def serve() -> None:
        listener.settimeout(5)
        conn, peer = listener.accept()
        with conn:
            seen.append(peer[0])
            conn.sendall(conn.recv(64).upper())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        target = server.ipv6 if ipv6 else server.ipv4
        assert target is not None
        with client.connect(target, listener.getsockname()[1], timeout=5) as sock:
            sock.sendall(b"ping")
            assert sock.recv(64) == b"PING"
    finally:
        thread.join(timeout=5)
        listener.close()
    assert not thread.is_alive()
    return seen[0]


def icmp_unreachables_sent(ns: Netns) -> tuple[int, int]:
    """(IPv4, IPv6) destination-unreachable errors this netns has sent."""
    snmp = run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    header, values = (line.split() for line in snmp if line.startswith("Icmp:"))
    v4 = int(dict(zip(header, values, strict=True))["OutDestUnreachs"])
    snmp6 = dict(line.split() for line in run(ns, ["cat", "/proc/net/snmp6"]).stdout.splitlines())
    return v4, int(snmp6["Icmp6OutDestUnreachs"])


def veths(node: Node) -> list[str]:
    out = node.run(["ip", "-o", "link", "show", "type", "veth"]).stdout
    return sorted(line.split(": ")[1].split("@")[0] for line in out.splitlines())


def host_local_ips(topology: LocalTopology, node: Node) -> set[str]:
    """The addresses host-local has on record as leased on `node` (one file each)."""
    store = topology.work_dir / "host-local" / node.name / f"localmesh-{node.name}"
    leased = set()
    for entry in store.iterdir():
        try:
            leased.add(str(ipaddress.ip_address(entry.name)))
        except ValueError:
            continue  # lock, last_reserved_ip.N
    return leased


def host_network_state() -> dict[str, str]:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    return {
        "links": out("ip", "-o", "link"),
        "routes": out("ip", "route"),
        "routes6": out("ip", "-6", "route"),
        "rules": out("ip", "rule"),
    }


def test_pods_get_addresses_from_host_local(topology):
    node = topology.add_node("a", "10.244.1.0/24", "fd42:244:1::/64")
    v4_only = topology.add_pod(node, "web")
    start = time.monotonic()
    dual = topology.add_pod(node, "db", "storage", dual_stack=True)
    # DAD is off in pods and nodes; with it, the bridge plugin waits ~2 s for the address.
    assert time.monotonic() - start < 1.0

    assert v4_only.ipv4 in node.pod_cidr_v4
    assert v4_only.ipv4 != IPv4Address("10.244.1.1")  # the gateway, on the node's bridge
    assert v4_only.ipv6 is None
    assert dual.ipv4 in node.pod_cidr_v4
    assert dual.ipv4 != v4_only.ipv4
    assert dual.ipv6 is not None
    assert dual.ipv6 in node.pod_cidr_v6
    # host-local recorded both leases in our own data dir, nowhere else.
    assert host_local_ips(topology, node) == {str(v4_only.ipv4), str(dual.ipv4), str(dual.ipv6)}
    assert not Path("/var/lib/cni/networks/localmesh-a").exists()

    addrs = dual.run(["ip", "-o", "addr", "show", "dev", "eth0", "scope", "global"]).stdout
    assert f"inet {dual.ipv4}/24" in addrs
    assert f"inet6 {dual.ipv6}/64" in addrs
    assert "default via 10.244.1.1" in dual.run(["ip", "route"]).stdout
    # The bridge plugin ran in the node netns: the pod's veth peer and the bridge are there.
    assert len(veths(node)) == 3  # two pods + the node's underlay uplink
    bridge = node.run(["ip", "-o", "addr", "show", "dev", node.bridge]).stdout
    assert "inet 10.244.1.1/24" in bridge


def test_tcp_between_pods_on_the_same_node_and_across_nodes(topology):
    a = topology.add_node("a", "10.244.1.0/24", "fd42:244:1::/64")
    b = topology.add_node("b", "10.244.2.0/24", "fd42:244:2::/64")
    a1 = topology.add_pod(a, "a1", dual_stack=True)
    a2 = topology.add_pod(a, "a2", dual_stack=True)
    b1 = topology.add_pod(b, "b1", dual_stack=True)

    for server, client in ((a2, a1), (b1, a1), (a1, b1)):
        # No masquerade anywhere: the server sees the client pod's own address.
        assert echo_once(server, client) == str(client.ipv4)
        assert echo_once(server, client, ipv6=True) == str(client.ipv6)


def test_traffic_outside_every_pod_cidr_dies_in_the_underlay(topology):
    node = topology.add_node("a", "10.244.1.0/24", "fd42:244:1::/64")
    pod = topology.add_pod(node, "p", dual_stack=True)
    before = icmp_unreachables_sent(topology.underlay)

    start = time.monotonic()
    with pytest.raises(OSError) as v4_err:
        pod.connect(IPv4Address("203.0.113.7"), 80, timeout=5)
    v4_elapsed = time.monotonic() - start
    start = time.monotonic()
    with pytest.raises(OSError) as v6_err:
        pod.connect(IPv6Address("2001:db8::7"), 80, timeout=5)
    v6_elapsed = time.monotonic() - start

    assert v4_err.value.errno in UNREACHABLE
    assert v6_err.value.errno in UNREACHABLE
    assert v4_elapsed < 0.5
    # The first ICMPv6 error arrives while connect() still holds the socket
    # (the kernel counts it in LockDroppedIcmps); the SYN retransmit at 1 s gets the next.
    assert v6_elapsed < 2.5
    after = icmp_unreachables_sent(topology.underlay)
    assert after[0] > before[0]
    assert after[1] > before[1]


def test_close_removes_everything_and_never_touches_the_host(leftovers):
    host_before = host_network_state()
    var_lib_cni = Path("/var/lib/cni").exists()

    topo = LocalTopology()
    with topo:
        a = topo.add_node("a", "10.244.1.0/24", "fd42:244:1::/64")
        b = topo.add_node("b", "10.244.2.0/24")
        topo.add_pod(a, "a1", dual_stack=True)
        topo.add_pod(b, "b1")
        work_dir = topo.work_dir
        assert len(leftovers(topo.prefix)) == 6  # underlay, 2 nodes, 2 pods, work dir
        assert host_network_state() == host_before  # wired only among our namespaces
    assert leftovers(topo.prefix) == []
    assert not work_dir.exists()
    assert host_network_state() == host_before
    assert Path("/var/lib/cni").exists() == var_lib_cni
    topo.close()  # a second close is harmless


def test_cni_error_is_typed_and_leaves_nothing_behind(topology):
    # A /30 holds one pod: host-local keeps .1 for the gateway, .3 is broadcast.
    node = topology.add_node("tiny", "10.244.9.0/30")
    first = topology.add_pod(node, "first")
    veths_with_one_pod = veths(node)

    with pytest.raises(CniPluginError) as err:
        topology.add_pod(node, "second")

    assert err.value.plugin == "bridge"  # host-local's failure, relayed by its caller
    assert err.value.command == "ADD"
    assert isinstance(err.value.code, int)
    assert "no IP addresses available" in err.value.msg
    assert not err.value.retryable
    assert not Path(f"/var/run/netns/{topology.prefix}-pod-default-second").exists()
    assert veths(node) == veths_with_one_pod
    assert host_local_ips(topology, node) == {str(first.ipv4)}
    assert topology.pods == [first]

    # Nothing was stranded: once the first pod is gone its address is free again.
    topology.remove_pod(first)
    assert host_local_ips(topology, node) == set()
    assert not first.netns.path.exists()
    second = topology.add_pod(node, "second")
    assert second.ipv4 == first.ipv4


def test_chained_plugin_gets_prev_result_and_check_and_del_run_the_chain(topology):
    tuning = {"type": "tuning", "mtu": 1280}
    node = topology.add_node("a", "10.244.1.0/24", chained_plugins=[tuning])
    pod = topology.add_pod(node, "p")
    call = {
        "container_id": pod.container_id,
        "netns_path": pod.netns.path,
        "ifname": "eth0",
        "cni_path": topology.cni_path,
        "cni_args": pod.cni_args,
        "netns": node.netns,
    }

    # tuning refuses to run without prevResult, and passes it on as its own result.
    alone = {"cniVersion": "1.0.0", "name": "alone", "plugins": [{"type": "tuning"}]}
    with pytest.raises(CniPluginError, match="prevResult"):
        invoke_chain(alone, "ADD", **call)
    assert "mtu 1280" in pod.run(["ip", "-o", "link", "show", "eth0"]).stdout
    assert [ipaddress.ip_interface(ip["address"]).ip for ip in pod.cni_result["ips"]] == [pod.ipv4]
    assert pod.cni_result["interfaces"][2]["sandbox"] == str(pod.netns.path)

    invoke_chain(pod.conflist, "CHECK", prev_result=pod.cni_result, **call)
    pod.run(["ip", "link", "set", "eth0", "mtu", "1400"])
    with pytest.raises(CniPluginError) as err:
        invoke_chain(pod.conflist, "CHECK", prev_result=pod.cni_result, **call)
    assert err.value.plugin == "tuning"  # bridge's CHECK passed; tuning's found the drift
    assert "1280" in err.value.msg

    topology.remove_pod(pod)
    assert host_local_ips(topology, node) == set()
    assert len(veths(node)) == 1  # only the underlay uplink


def test_invalid_requests_are_refused_before_anything_is_created(topology, leftovers):
    node = topology.add_node("a", "10.244.1.0/24")
    before = leftovers(topology.prefix)
    bad_calls = [
        lambda: topology.add_node("b", "10.244.1.128/25"),  # overlaps node a
        lambda: topology.add_node("b", "10.250.0.0/25"),  # overlaps the underlay
        lambda: topology.add_node("a", "10.244.2.0/24"),  # duplicate name
        lambda: topology.add_node("B_x", "10.244.2.0/24"),  # not a DNS label
        lambda: topology.add_pod(node, "p", dual_stack=True),  # node has no IPv6 CIDR
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInputError, match=r"overlaps|already exists|DNS label|IPv6"):
            call()
    assert leftovers(topology.prefix) == before


def test_failed_add_node_is_rolled_back(topology, monkeypatch, leftovers):
    a = topology.add_node("a", "10.244.1.0/24", "fd42:244:1::/64")
    before = leftovers(topology.prefix)
    real_add_routes = wiring.add_routes

    def fail_routes_in_node_a(ns, routes):
        # The last step of add_node: teach existing nodes the new node's pod CIDRs.
        if ns == a.netns:
            real_add_routes(ns, routes[:1])
            raise NodeSetupError("injected failure")
        real_add_routes(ns, routes)

    monkeypatch.setattr(wiring, "add_routes", fail_routes_in_node_a)
    with pytest.raises(NodeSetupError, match="injected"):
        topology.add_node("b", "10.244.2.0/24", "fd42:244:2::/64")
    monkeypatch.undo()

    assert leftovers(topology.prefix) == before
    assert "10.244.2.0" not in a.run(["ip", "route"]).stdout
    assert "10.244.2.0" not in run(topology.underlay, ["ip", "route"]).stdout
    assert "fd42:244:2::" not in run(topology.underlay, ["ip", "-6", "route"]).stdout
    assert [n.name for n in topology.nodes] == ["a"]
    # Nothing stale blocks a second attempt, and it works end to end.
    b = topology.add_node("b", "10.244.2.0/24", "fd42:244:2::/64")
    pa, pb = topology.add_pod(a, "pa"), topology.add_pod(b, "pb")
    assert echo_once(pb, pa) == str(pa.ipv4)


def test_a_topology_leaves_the_process_signal_handlers_alone():
    # What SIGTERM means is up to the process that owns the topology (weir demo, a test run).
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with LocalTopology() as topo:
        topo.add_node("a", "10.244.1.0/24")
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


CHILD = """
import signal, sys, time
from node_agent.localmesh.topology import LocalTopology
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
# As weir demo does: the owner of the process makes SIGTERM unwind through close().
signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
with LocalTopology() as topo:
    node = topo.add_node("a", "10.244.1.0/24", "fd42:244:1::/64")
    topo.add_pod(node, "p", dual_stack=True)
    print(topo.prefix, flush=True)
    time.sleep(30)
"""


def start_child_topology() -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert child.stdout is not None
    prefix = child.stdout.readline().strip()
    assert prefix.startswith("wlm"), f"child topology did not come up (exit {child.poll()})"
    return child, prefix


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_process_cleans_up(sig, leftovers):
    child, prefix = start_child_topology()
    try:
        assert len(leftovers(prefix)) == 4
        child.send_signal(sig)
        child.wait(timeout=15)
        remaining = leftovers(prefix)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        sweep(prefix)  # so a failure here does not leak into later tests
    assert remaining == []
    assert child.returncode != 0


def test_sweep_removes_what_a_killed_run_left(leftovers):
    child, prefix = start_child_topology()
    try:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=15)
        assert len(leftovers(prefix)) == 4  # SIGKILL leaves everything behind
    finally:
        removed = sweep(prefix)
    assert len(removed) == 4
    assert leftovers(prefix) == []
    with pytest.raises(InvalidInputError, match="does not start with"):
        sweep("eth")


@pytest.mark.parametrize("name", ["a/b", "..", ""])
def test_a_netns_name_is_never_taken_for_a_path(name, tmp_path, monkeypatch):
    # pyroute2 would create (or unmount) a relative path under the working directory.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError, match="not a network namespace name"):
        wiring.create_netns(name)
    with pytest.raises(InvalidInputError, match="not a network namespace name"):
        wiring.delete_netns(name)
    assert list(tmp_path.iterdir()) == []
