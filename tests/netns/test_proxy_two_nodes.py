"""Two nodes, a proxy on each: pod A reaches pod B only through HBONE, only as itself.

Real namespaces, real iptables capture, real certificates from the control
plane's CA. Between the nodes a tcpdump in the underlay shows what is on the
wire.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.ca import load_or_create_root
from node_agent.netns import entered
from node_agent.proxy.model import Action, AuthorizationPolicy, MtlsMode, Rule, Service, ServicePort
from node_agent.proxy.telemetry import CLOSED, FAILED, OPENED, REFUSED, SENT
from testbed.proxy_lab import EchoServer, MeshLab, open_lab

pytestmark = pytest.mark.netns

APP_PORT = 8080
VIP = "10.96.0.10"
SERVERS: dict[str, EchoServer] = {}  # the apps, by pod name, for the module's lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    with open_lab(tmp_path_factory.mktemp("proxy-lab")) as lab:
        lab.add_node("node-1", "10.244.1.0/24")
        lab.add_node("node-2", "10.244.2.0/24")
        lab.add_pod("node-1", "a")
        lab.add_pod("node-2", "b")
        lab.add_pod("node-1", "plain", captured=False)  # not in the mesh's data path
        lab.add_pod("node-2", "plain-2", captured=False)
        lab.services["default/b"] = Service(
            "b", "default", (VIP,), (ServicePort(80, APP_PORT),), ("default/b",)
        )
        lab.publish()
        for name in ("b", "plain", "plain-2"):
            SERVERS[name] = EchoServer(lab.pods[name], APP_PORT)
        try:
            yield lab
        finally:
            for server in SERVERS.values():
                server.close()
            SERVERS.clear()


@pytest.fixture(autouse=True)
def _restore_mesh(lab: MeshLab) -> Iterator[None]:
    yield
    lab.policies.clear()
    for name in ("a", "b"):
        lab.set_workload(lab.pods[name], mtls_mode=MtlsMode.STRICT)
    lab.publish()


def echo(lab: MeshLab, src: str, dst: str, port: int, payload: bytes) -> bytes:
    """Send `payload` from pod `src`, half-close, and return everything echoed back."""
    pod = lab.pods[src]
    with socket.socket() as s:
        _in_netns(pod, s)
        s.settimeout(5)
        s.connect((dst, port))
        received = bytearray()
        # A refused connection is reset by the proxy: whatever step sees it, b"" results.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, OSError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                received += chunk
        return bytes(received)


def echo6(lab: MeshLab, src: str, dst: str, port: int, payload: bytes) -> bytes:
    with entered(lab.pods[src].netns):
        sock = socket.socket(socket.AF_INET6)
    with sock:
        sock.settimeout(5)
        sock.connect((dst, port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(65536)


def _in_netns(pod, sock: socket.socket) -> None:
    # A socket belongs to the netns it was created in: recreate it inside the pod.
    with entered(pod.netns):
        fresh = socket.socket()
    os.dup2(fresh.fileno(), sock.fileno())
    fresh.close()


def node(lab: MeshLab, name: str):
    return lab.nodes[name]


def logged(lab: MeshLab, node_name: str, count_before: int, **match) -> dict:
    """The first access log entry after `count_before` whose top-level fields match.

    A proxy logs when it has closed both sides, which can be a moment after
    the client saw the end: poll briefly.
    """
    entries = lab.nodes[node_name].access_log.entries
    for _ in range(50):
        for entry in entries[count_before:]:
            if all(entry.get(k) == v for k, v in match.items()):
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no entry matching {match} in {entries[count_before:]}")


@contextlib.contextmanager
def tcpdump(lab: MeshLab, pcap: Path) -> Iterator[None]:
    """Capture everything crossing the underlay bridge while the block runs."""
    with entered(lab.topology.underlay):  # the child starts in the underlay netns
        proc = subprocess.Popen(
            ["tcpdump", "-Z", "root", "-i", "any", "--immediate-mode", "-U", "-w", str(pcap)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    try:
        assert proc.stderr is not None
        # "listening on any ..." comes once the capture is armed.
        said = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b"listening" not in said:
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            if ready:
                said += os.read(proc.stderr.fileno(), 4096)
        assert b"listening" in said, said
        # "listening" can precede the capture seeing packets: wait for a probe to show up.
        probe = b"WEIR-PROBE-" + os.urandom(8).hex().encode()
        n1, n2 = lab.nodes["node-1"].node, lab.nodes["node-2"].node
        with entered(n1.netns):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp:
            for _ in range(50):
                udp.sendto(probe, (str(n2.underlay_ipv4), 9))
                time.sleep(0.1)
                if pcap.exists() and probe in pcap.read_bytes():
                    break
            else:
                pytest.fail("tcpdump in the underlay never saw the probe")
        yield
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


A = "spiffe://cluster.local/ns/default/sa/a"
B = "spiffe://cluster.local/ns/default/sa/b"


def test_a_reaches_b_through_both_proxies_with_only_tls_between_nodes(lab, tmp_path):
    marker = b"WEIR-MARKER-" + os.urandom(8).hex().encode()
    plain_marker = b"WEIR-CONTROL-" + os.urandom(8).hex().encode()
    b_ip = str(lab.pods["b"].ipv4)
    pcap = tmp_path / "underlay.pcap"
    seen_by_b = len(lab.nodes["node-2"].access_log.entries)
    seen_by_a = len(lab.nodes["node-1"].access_log.entries)
    served = len(SERVERS["b"].exchanges)
    with tcpdump(lab, pcap):
        assert echo(lab, "a", VIP, 80, marker * 100) == marker * 100
        # Control: to a pod outside the mesh the proxy passes bytes through in
        # clear, proving the capture would have seen the marker had it been sent so.
        plain_2 = str(lab.pods["plain-2"].ipv4)
        assert echo(lab, "a", plain_2, APP_PORT, plain_marker) == plain_marker
    raw = pcap.read_bytes()
    assert plain_marker in raw
    assert marker not in raw
    tunnel_packets = subprocess.run(
        ["tcpdump", "-nn", "-r", str(pcap), f"tcp port 15008 and host {b_ip}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(tunnel_packets) > 10

    inbound = logged(lab, "node-2", seen_by_b, outcome="ok", reporter="destination")
    assert inbound["src"] == {
        "addr": str(lab.pods["a"].ipv4),
        "workload": "default/a",
        "identity": A,
    }
    assert inbound["dst"]["workload"] == "default/b"
    assert inbound["security_policy"] == "mutual_tls"
    assert inbound["bytes_received"] == len(marker) * 100
    assert inbound["bytes_sent"] == len(marker) * 100
    outbound = logged(lab, "node-1", seen_by_a, outcome="ok", security_policy="mutual_tls")
    assert outbound["dst"]["service"] == "default/b"
    assert outbound["dst"]["identity"] == B
    # B's app was reached from inside its own netns (its proxy), not from A's address.
    exchange = SERVERS["b"].exchanges[served]
    assert exchange.peer[0] == b_ip
    assert exchange.received == marker * 100


def test_pod_ip_is_reached_without_a_service(lab):
    before = len(lab.nodes["node-1"].access_log.entries)
    assert echo(lab, "a", str(lab.pods["b"].ipv4), APP_PORT, b"hello") == b"hello"
    entry = logged(lab, "node-1", before, outcome="ok")
    assert entry["dst"]["service"] is None
    assert entry["dst"]["identity"] == B


def test_many_connections_share_one_pooled_tls_connection(lab):
    pool = lab.nodes["node-1"].proxy.pool
    dials = pool.dials
    for i in range(20):
        assert echo(lab, "a", VIP, 80, b"n%d" % i) == b"n%d" % i
    assert pool.dials == dials  # the tunnel from earlier tests carried them all


def test_stream_refused_on_a_pooled_connection_is_retried_on_a_fresh_one(lab):
    assert echo(lab, "a", VIP, 80, b"warm") == b"warm"  # the pool holds a connection
    pool = lab.nodes["node-1"].proxy.pool
    dials = pool.dials
    b = lab.nodes["node-2"].proxy.pod(lab.pods["b"].uid)
    tunnels = list(b.tunnels)
    assert tunnels

    def refuse_new_streams():
        # As a peer does while draining: open streams go on, new ones are refused.
        for conn in tunnels:
            conn.draining = True

    lab.loop.loop.call_soon_threadsafe(refuse_new_streams)
    assert echo(lab, "a", VIP, 80, b"retried") == b"retried"
    assert pool.dials == dials + 1


def test_metrics_count_both_sides(lab):
    m1, m2 = node(lab, "node-1").proxy.metrics, node(lab, "node-2").proxy.metrics
    labels_in = {"reporter": "destination", "source_principal": A, "destination_principal": B}
    labels_out = {"reporter": "source", "destination_service": "default/b"}
    opened, closed = m2.value(OPENED, **labels_in), m1.value(CLOSED, **labels_out)
    sent = m1.value(SENT, **labels_out)
    before = {n: len(lab.nodes[n].access_log.entries) for n in ("node-1", "node-2")}
    assert echo(lab, "a", VIP, 80, b"x" * 1000) == b"x" * 1000
    for node_name, count in before.items():  # both proxies are done with it
        logged(lab, node_name, count, outcome="ok")
    assert m2.value(OPENED, **labels_in) == opened + 1
    assert m1.value(CLOSED, connection_security_policy="mutual_tls", **labels_out) == closed + 1
    assert m1.value(SENT, **labels_out) == sent + 1000
    text = m2.render()
    assert "# TYPE istio_tcp_connections_opened_total counter" in text
    assert f'source_principal="{A}"' in text


def test_deny_policy_refuses(lab):
    lab.policies["default/deny-a"] = AuthorizationPolicy(
        "deny-a", "default", Action.DENY, (Rule(source_principals=(A,)),)
    )
    lab.publish()
    before = len(lab.nodes["node-2"].access_log.entries)
    failed = node(lab, "node-2").proxy.metrics.value(FAILED, source_principal=A)
    assert echo(lab, "a", VIP, 80, b"nope") == b""
    assert logged(lab, "node-2", before, outcome="denied")["reason"] == "deny:default/deny-a"
    assert node(lab, "node-2").proxy.metrics.value(FAILED, source_principal=A) == failed + 1


def test_allow_for_someone_else_refuses_and_for_a_admits(lab):
    lab.policies["default/allow-c"] = AuthorizationPolicy(
        "allow-c",
        "default",
        Action.ALLOW,
        (Rule(source_principals=("spiffe://cluster.local/ns/default/sa/c",)),),
    )
    lab.publish()
    before = len(lab.nodes["node-2"].access_log.entries)
    assert echo(lab, "a", VIP, 80, b"nope") == b""
    assert logged(lab, "node-2", before, outcome="denied")["reason"] == "no-allow-match"
    lab.policies["default/allow-a"] = AuthorizationPolicy(
        "allow-a",
        "default",
        Action.ALLOW,
        (Rule(source_namespaces=("default",), destination_ports=(APP_PORT,)),),
    )
    lab.publish()
    assert echo(lab, "a", VIP, 80, b"yes") == b"yes"


def test_strict_refuses_plaintext_and_permissive_admits_it(lab):
    b_ip = str(lab.pods["b"].ipv4)
    m2 = node(lab, "node-2").proxy.metrics
    refused = m2.value(REFUSED, listener="plaintext", reason="strict_mtls")
    # plain is not captured: it sends cleartext, which b's capture hands to 15006.
    assert echo(lab, "plain", b_ip, APP_PORT, b"clear") == b""
    assert m2.value(REFUSED, listener="plaintext", reason="strict_mtls") == refused + 1
    lab.set_workload(lab.pods["b"], mtls_mode=MtlsMode.PERMISSIVE)
    lab.publish()
    before = len(lab.nodes["node-2"].access_log.entries)
    assert echo(lab, "plain", b_ip, APP_PORT, b"clear") == b"clear"
    entry = logged(lab, "node-2", before, outcome="ok")
    assert entry["security_policy"] == "none"
    assert entry["src"]["workload"] == "default/plain"
    assert entry["src"]["identity"] is None


def test_outside_the_mesh_passes_through_in_plaintext(lab):
    before = len(lab.nodes["node-1"].access_log.entries)
    plain_ip = str(lab.pods["plain"].ipv4)
    assert echo(lab, "a", plain_ip, APP_PORT, b"to-plain") == b"to-plain"
    entry = logged(lab, "node-1", before, outcome="ok")
    assert entry["security_policy"] == "none"
    assert entry["dst"]["workload"] == "default/plain"


def test_wrong_spiffe_id_is_refused(lab):
    """Node 1 is told b runs as another service account: b's real cert must not pass."""
    b = lab.workload(lab.pods["b"])
    m1 = node(lab, "node-1").proxy.metrics
    refused = m1.value(REFUSED, reason="wrong_peer_identity")
    impostor = {**lab.workloads, b.key: dataclasses.replace(b, service_account="payments")}
    lab.publish(lab.snapshot(workloads=impostor), only="node-1")
    before = len(lab.nodes["node-1"].access_log.entries)
    assert echo(lab, "a", VIP, 80, b"secret") == b""
    assert m1.value(REFUSED, reason="wrong_peer_identity") > refused
    entry = logged(lab, "node-1", before, outcome="upstream_unreachable")
    assert "expected spiffe://cluster.local/ns/default/sa/payments" in entry["reason"]


def test_peer_from_another_ca_is_refused_and_trust_bundle_updates_live(lab, tmp_path):
    """Node 1 trusts only a foreign root: b's cert fails; trusting ours again heals it."""
    foreign = load_or_create_root(tmp_path / "foreign", "cluster.local", now=_now())
    lab.publish(
        dataclasses.replace(lab.snapshot(), trust_bundle_pem=tuple(foreign.trust_bundle_pem)),
        only="node-1",
    )
    before = len(lab.nodes["node-1"].access_log.entries)
    assert echo(lab, "a", VIP, 80, b"secret") == b""
    entry = logged(lab, "node-1", before, outcome="upstream_unreachable")
    assert "CERTIFICATE_VERIFY_FAILED" in entry["reason"]
    lab.publish()
    assert echo(lab, "a", VIP, 80, b"healed") == b"healed"


def _now():
    return datetime.datetime.now(datetime.UTC)


def test_ipv6_through_both_proxies(tmp_path):
    with open_lab(tmp_path) as lab6:
        lab6.add_node("node-1", "10.244.1.0/24", "fd00:244:1::/64")
        lab6.add_node("node-2", "10.244.2.0/24", "fd00:244:2::/64")
        lab6.add_pod("node-1", "a", dual_stack=True)
        b = lab6.add_pod("node-2", "b", dual_stack=True)
        vip6 = "fd96::10"
        lab6.services["default/b"] = Service(
            "b", "default", (VIP, vip6), (ServicePort(80, APP_PORT),), ("default/b",)
        )
        lab6.publish()
        server = EchoServer(b, APP_PORT, ipv6=True)
        try:
            before = len(lab6.nodes["node-2"].access_log.entries)
            assert echo6(lab6, "a", str(b.ipv6), APP_PORT, b"over v6") == b"over v6"
            assert echo6(lab6, "a", vip6, 80, b"v6 vip") == b"v6 vip"
            entry = logged(lab6, "node-2", before, outcome="ok")
            assert entry["dst"]["addr"] == f"[{b.ipv6}]:{APP_PORT}"
            assert entry["src"]["identity"] == A
        finally:
            server.close()
