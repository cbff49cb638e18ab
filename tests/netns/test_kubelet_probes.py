"""Kubelet probes of a STRICT-captured pod: the node gets through, nobody else does.

One node netns, pods A (captured) and B (not) on its bridge, dual stack. A
runs an app on APP_PORT that says who it saw, and, on 15006, a stand-in for
the proxy under STRICT mTLS: it accepts and aborts (RST), as the real
proxy's inbound side does with plaintext (node_agent/proxy/inbound.py). The
"kubelet" is a socket made in the node netns, as the kubelet's are.

With the node's WEIR-HOST-PROBES in place, the node's TCP connects and HTTP
GETs reach the app from the probe source; without them they land on the
stand-in and fail, which shows the test can fail. B's plaintext to the same
port is captured either way, and a SYN that B forges from the probe source
gets its SYN-ACK sent to the node, never to B, so B cannot complete the
handshake. Every case runs under iptables (both backends) and eBPF.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import random
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from node_agent import netns as netns_mod
from node_agent.constants import INBOUND_PLAINTEXT_CAPTURE_PORT, PROBE_SNAT_IPV4, PROBE_SNAT_IPV6
from node_agent.localmesh.topology import LocalTopology, Node, Pod
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import BPFFS, PinLayout
from node_agent.redirect.host_probes import HostProbes, remove_host_probes
from node_agent.redirect.iptables import IptablesCapture
from node_agent.redirect.modes import CaptureMode

pytestmark = pytest.mark.netns

APP_PORT: Final = 8080
PROBE_SOURCE: Final = {4: PROBE_SNAT_IPV4, 6: PROBE_SNAT_IPV6}
MODES: Final = ["iptables-nft", "iptables-legacy", "ebpf"]
FAMILIES = pytest.mark.parametrize("family", [4, 6])
_IO_TIMEOUT_S: Final = 2.0


@dataclass
class Seen:
    """Peers (address, port) each listener accepted, in order."""

    app: list[tuple[str, int]] = field(default_factory=list)
    proxy: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, where: list[tuple[str, int]], peer: tuple[str, int]) -> None:
        with self.lock:
            where.append((str(ipaddress.ip_address(peer[0])), int(peer[1])))


class PodServers:
    """A's app and the STRICT proxy stand-in, each on 0.0.0.0 and [::] in A's netns."""

    def __init__(self, ns: Netns) -> None:
        self.seen = Seen()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        for port, serve in ((APP_PORT, self._app), (INBOUND_PLAINTEXT_CAPTURE_PORT, self._strict)):
            for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                with netns_mod.entered(ns):
                    sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
                sock.listen(64)
                sock.settimeout(0.2)
                self._sockets.append(sock)
                thread = threading.Thread(target=self._accept, args=(sock, serve), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _accept(self, listener: socket.socket, serve: object) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            assert callable(serve)
            with conn:
                serve(conn, peer)

    def _app(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.seen.add(self.seen.app, peer)
        conn.settimeout(_IO_TIMEOUT_S)
        with contextlib.suppress(OSError):
            first = conn.recv(1024)
            if first.startswith(b"GET "):
                body = f"app saw {ipaddress.ip_address(peer[0])}".encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            else:
                conn.sendall(b"app\n")

    def _strict(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.seen.add(self.seen.proxy, peer)
        # SO_LINGER 0: close sends RST, as the proxy's abort() of refused plaintext does.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self._stop.set()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(timeout=2)


@dataclass
class Probed:
    node: Node
    a: Pod
    b: Pod
    servers: PodServers
    host: HostProbes

    def ip(self, pod: Pod, family: int) -> str:
        return str(pod.ipv6 if family == 6 else pod.ipv4)

    def gateway(self, family: int) -> str:
        """The node's address on the pod network: where a probe comes from without the SNAT."""
        ips = self.a.cni_result["ips"]
        ip = next(r for r in ips if ipaddress.ip_interface(r["address"]).version == family)
        return str(ipaddress.ip_address(ip["gateway"]))


def _connect(ns: Netns, dst: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with netns_mod.entered(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(_IO_TIMEOUT_S)
    try:
        sock.connect((dst, port))
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_probe(ns: Netns, dst: str, port: int) -> bytes:
    """Connect, say hello, return what came back (b"" or an exception text when refused)."""
    try:
        with _connect(ns, dst, port) as sock:
            sock.sendall(b"ping\n")
            return sock.recv(64)
    except OSError as e:
        return f"failed: {e!r}".encode()


def http_probe(ns: Netns, dst: str, port: int) -> tuple[int, str]:
    """An HTTP GET over a socket made in `ns`: (status, body), or (0, the error)."""
    conn = http.client.HTTPConnection(f"[{dst}]" if ":" in dst else dst, port, timeout=2)
    try:
        conn.sock = _connect(ns, dst, port)
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return response.status, response.read().decode()
    except (OSError, http.client.HTTPException) as e:
        return 0, repr(e)
    finally:
        conn.close()


@contextlib.contextmanager
def capture_mode(mode: str) -> Iterator[tuple[CaptureMode, Backend]]:
    """The pod's capture, and the iptables backend the node's own rules use."""
    if mode != "ebpf":
        backend = Backend(mode.removeprefix("iptables-"))
        yield IptablesCapture(backend), backend
        return
    pins = PinLayout(BPFFS / f"weirtest-{uuid.uuid4().hex[:8]}")
    try:
        with EbpfCapture(pins) as capture:
            yield capture, Backend.NFT
    finally:
        loader.uninstall(pins)
    assert not Path(pins.root).exists()


@pytest.fixture(scope="module", params=MODES)
def probed(request: pytest.FixtureRequest) -> Iterator[Probed]:
    with LocalTopology() as topo:
        node = topo.add_node("node-1", "10.244.1.0/24", "fd00:244:1::/64")
        a = topo.add_pod(node, "a", dual_stack=True)
        b = topo.add_pod(node, "b", dual_stack=True)
        servers = PodServers(a.netns)
        try:
            with capture_mode(request.param) as (capture, backend):
                # The proxy's listener must exist first: eBPF steers to that very socket.
                capture.apply(a.netns, CaptureConfig())
                try:
                    host = HostProbes(backend, node.netns)
                    host.add(a.uid, [str(a.ipv4), str(a.ipv6)])
                    yield Probed(node, a, b, servers, host)
                finally:
                    remove_host_probes(node.netns)
                    capture.remove(a.netns)
        finally:
            servers.close()


@pytest.fixture
def with_rules(probed: Probed) -> Probed:
    probed.host.converge()
    assert probed.host.check() == []
    return probed


@pytest.fixture
def without_rules(probed: Probed) -> Iterator[Probed]:
    assert remove_host_probes(probed.node.netns)
    try:
        yield probed
    finally:
        probed.host.converge()


@FAMILIES
def test_node_tcp_connect_reaches_the_app_as_the_probe_source(with_rules, family):
    p = with_rules
    before = len(p.servers.seen.app)
    assert tcp_probe(p.node.netns, p.ip(p.a, family), APP_PORT) == b"app\n"
    assert [ip for ip, _ in p.servers.seen.app[before:]] == [PROBE_SOURCE[family]]


@FAMILIES
def test_node_http_get_reaches_the_app(with_rules, family):
    p = with_rules
    assert http_probe(p.node.netns, p.ip(p.a, family), APP_PORT) == (
        200,
        f"app saw {PROBE_SOURCE[family]}",
    )


@FAMILIES
def test_without_the_node_rules_probes_land_on_the_proxy_and_fail(without_rules, family):
    p = without_rules
    app, proxy = len(p.servers.seen.app), len(p.servers.seen.proxy)
    assert tcp_probe(p.node.netns, p.ip(p.a, family), APP_PORT) != b"app\n"
    status, error = http_probe(p.node.netns, p.ip(p.a, family), APP_PORT)
    assert status == 0, error
    assert len(p.servers.seen.app) == app
    assert [ip for ip, _ in p.servers.seen.proxy[proxy:]] == [p.gateway(family)] * 2


@FAMILIES
def test_another_pod_is_still_captured_and_refused(with_rules, family):
    p = with_rules
    app, proxy = len(p.servers.seen.app), len(p.servers.seen.proxy)
    assert tcp_probe(p.b.netns, p.ip(p.a, family), APP_PORT) != b"app\n"
    status, error = http_probe(p.b.netns, p.ip(p.a, family), APP_PORT)
    assert status == 0, error
    assert len(p.servers.seen.app) == app
    assert [ip for ip, _ in p.servers.seen.proxy[proxy:]] == [p.ip(p.b, family)] * 2


def test_the_node_rules_follow_the_enrolled_pods(with_rules):
    """A departed pod's rule goes; converge puts back what the enrolled set needs."""
    p = with_rules
    p.host.remove(p.a.uid)
    try:
        assert tcp_probe(p.node.netns, p.ip(p.a, 4), APP_PORT) != b"app\n"
    finally:
        p.host.add(p.a.uid, [str(p.a.ipv4), str(p.a.ipv6)])
    assert tcp_probe(p.node.netns, p.ip(p.a, 4), APP_PORT) == b"app\n"


# -- forging the probe source ------------------------------------------------

_ETH_P_ALL: Final = 0x0003
_ETH_P_IP: Final = 0x0800
_SYN, _ACK = 0x02, 0x10


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def forged_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 TCP SYN from `src`, whatever the sender's own address is."""
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    seq = random.getrandbits(32)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, _SYN, 64240, 0, 0)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    # The kernel fills in the IP checksum, the id and the total length.
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, socket.IPPROTO_TCP, 0, saddr, daddr
    )
    return ip + tcp


def _sniffer(ns: Netns, ifname: str) -> socket.socket:
    with netns_mod.entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.bind((ifname, 0))
    return sock


def _syn_acks(sock: socket.socket, src: str, dst: str, dport: int, wait: float) -> int:
    """SYN-ACKs src -> dst:dport the sniffer sees within `wait` seconds (stops at the first)."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            frame = sock.recv(65535)
        except TimeoutError:
            break
        if len(frame) < 54 or struct.unpack_from("!H", frame, 12)[0] != _ETH_P_IP:
            continue
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != socket.IPPROTO_TCP:
            continue
        if socket.inet_ntoa(frame[26:30]) != src or socket.inet_ntoa(frame[30:34]) != dst:
            continue
        _, port = struct.unpack_from("!HH", frame, 14 + ihl)
        flags = frame[14 + ihl + 13]
        if port == dport and flags & (_SYN | _ACK) == _SYN | _ACK:
            return 1
    return 0


def test_a_pod_forging_the_probe_source_never_gets_the_syn_ack(with_rules):
    p = with_rules
    a, b = p.ip(p.a, 4), p.ip(p.b, 4)
    sport = random.randrange(20000, 60000)
    at_node = _sniffer(p.node.netns, p.node.bridge)
    at_b = _sniffer(p.b.netns, "eth0")
    with at_node, at_b:
        with netns_mod.entered(p.b.netns):
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with raw:
            raw.sendto(forged_syn(PROBE_SNAT_IPV4, a, sport, APP_PORT), (a, 0))
        # The forged SYN went past capture and A answered it, to the node...
        assert _syn_acks(at_node, a, PROBE_SNAT_IPV4, sport, wait=3) == 1
        # ...which is not B, and has nothing to de-NAT it to: B never hears back.
        assert _syn_acks(at_b, a, PROBE_SNAT_IPV4, sport, wait=1.5) == 0
    assert (PROBE_SNAT_IPV4, sport) not in p.servers.seen.app
    assert b not in {ip for ip, _ in p.servers.seen.app}
