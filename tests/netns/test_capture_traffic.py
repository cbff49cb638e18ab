"""Capture at the traffic level: where real connections from and to a pod land.

Pods are wired by the reference CNI plugins inside a node namespace. Pod A is
captured; every connection carries a token, and the listeners it could land
on (A's proxy ports, A's app, B's app) record which token they saw. A
connection that escapes capture to an address outside the topology dies in
the underlay, never on the host.

Every case runs in each capture mode: iptables through both backends, and
eBPF (programs attached at the cgroup v2 root, pinned under a pin root of
this module's own, removed again at the end).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent.constants import (
    INBOUND_PLAINTEXT_CAPTURE_PORT,
    INBOUND_TUNNEL_PORT,
    OUTBOUND_CAPTURE_PORT,
    PROXY_GID,
    PROXY_MARK,
    PROXY_UID,
)
from node_agent.localmesh.topology import LocalTopology, Pod
from node_agent.localmesh.traffic import TrafficObserver, connect
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig, parse_cidrs
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import BPFFS, PinLayout
from node_agent.redirect.iptables import IptablesCapture
from node_agent.redirect.modes import CaptureMode
from node_agent.redirect.selfcheck import verify

pytestmark = pytest.mark.netns

APP_PORT, OTHER_APP_PORT = 8080, 9090
OUTSIDE = {4: "203.0.113.7", 6: "2001:db8::7"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}


MODES = ["iptables-nft", "iptables-legacy", "ebpf"]


@dataclass
class Mesh:
    a: Pod
    b: Pod
    seen: TrafficObserver
    capture: CaptureMode
    mode: str

    def ip(self, pod: Pod, family: int) -> str:
        return str(pod.ipv6 if family == 6 else pod.ipv4)

    def inbound_original(self, dst: str, port: int) -> tuple[str, int] | None:
        """What the observer reports as the original destination of a captured inbound connection.

        iptables REDIRECTs to 15006, so the accepted socket's own address is
        15006 and SO_ORIGINAL_DST differs from it. sk_lookup hands the
        untouched connection to the 15006 listener: the socket's own address
        already is the original (SO_ORIGINAL_DST answers the same, shown in
        test_ebpf_original_dst.py), which the observer reports as None.
        """
        return None if self.mode == "ebpf" else (dst, port)

    def land(self, src: Pod, dst: str, port: int, **who: int) -> tuple[str | None, object]:
        """Connect and report (listener it landed on, original destination it saw)."""
        attempt = connect(src.netns, dst, port, **who)
        arrival = self.seen.wait_for(attempt.token, timeout=3)
        if arrival is None:
            return None, attempt.outcome
        assert attempt.outcome == "ok"
        return arrival.listener, arrival.original_dst


@contextlib.contextmanager
def capture_mode(mode: str) -> Iterator[CaptureMode]:
    if mode != "ebpf":
        yield IptablesCapture(Backend(mode.removeprefix("iptables-")))
        return
    pins = PinLayout(BPFFS / f"weirtest-{uuid.uuid4().hex[:8]}")
    try:
        with EbpfCapture(pins) as capture:
            yield capture
    finally:
        loader.uninstall(pins)
    assert not Path(pins.root).exists()


@pytest.fixture(scope="module", params=MODES)
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    with LocalTopology() as topo, TrafficObserver() as seen:
        node = topo.add_node("node-1", "10.244.1.0/24", "fd00:244:1::/64")
        a = topo.add_pod(node, "a", dual_stack=True)
        b = topo.add_pod(node, "b", dual_stack=True)
        for port, name in (
            (OUTBOUND_CAPTURE_PORT, "A:outbound-capture"),
            (INBOUND_PLAINTEXT_CAPTURE_PORT, "A:inbound-capture"),
            (INBOUND_TUNNEL_PORT, "A:tunnel"),
            (APP_PORT, "A:app"),
            (OTHER_APP_PORT, "A:other-app"),
        ):
            seen.listen(a.netns, name, port)
        seen.listen(b.netns, "B:app", APP_PORT)
        seen.listen(b.netns, "B:other-app", OTHER_APP_PORT)
        with capture_mode(request.param) as capture:
            try:
                yield Mesh(a, b, seen, capture, request.param)
            finally:
                capture.remove(a.netns)


@pytest.fixture
def captured(mesh: Mesh) -> Mesh:
    mesh.capture.apply(mesh.a.netns, CaptureConfig())
    return mesh


FAMILIES = pytest.mark.parametrize("family", [4, 6])


@FAMILIES
def test_outbound_lands_on_15001_with_original_destination(captured, family):
    dst = captured.ip(captured.b, family)
    assert captured.land(captured.a, dst, APP_PORT) == ("A:outbound-capture", (dst, APP_PORT))


@FAMILIES
def test_outbound_to_any_address_is_captured(captured, family):
    dst = OUTSIDE[family]
    assert captured.land(captured.a, dst, 443) == ("A:outbound-capture", (dst, 443))


@FAMILIES
def test_inbound_lands_on_15006_with_original_destination(captured, family):
    dst = captured.ip(captured.a, family)
    expected = ("A:inbound-capture", captured.inbound_original(dst, APP_PORT))
    assert captured.land(captured.b, dst, APP_PORT) == expected


@FAMILIES
def test_inbound_tunnel_port_is_not_captured(captured, family):
    dst = captured.ip(captured.a, family)
    assert captured.land(captured.b, dst, INBOUND_TUNNEL_PORT) == ("A:tunnel", None)


@FAMILIES
@pytest.mark.parametrize(
    "who",
    [
        {"uid": PROXY_UID, "gid": 4242},
        {"uid": 4242, "gid": PROXY_GID},
        {"mark": PROXY_MARK},
        {"mark": 0x1000 | PROXY_MARK},  # other tools' bits beside ours: still ours
    ],
    ids=["uid-1337", "gid-1337", "mark-0x539", "mark-0x1539"],
)
def test_proxy_traffic_goes_straight_out(captured, family, who):
    dst = captured.ip(captured.b, family)
    assert captured.land(captured.a, dst, APP_PORT, **who) == ("B:app", None)


@FAMILIES
@pytest.mark.parametrize(
    "who", [{"uid": 4242, "gid": 4242}, {"mark": 0x53A}], ids=["other-user", "other-mark"]
)
def test_everyone_else_is_captured(captured, family, who):
    dst = captured.ip(captured.b, family)
    assert captured.land(captured.a, dst, APP_PORT, **who)[0] == "A:outbound-capture"


@FAMILIES
def test_loopback_stays_in_the_pod(captured, family):
    assert captured.land(captured.a, LOOPBACK[family], APP_PORT) == ("A:app", None)


@FAMILIES
def test_escaped_connection_dies_in_the_underlay(mesh, family):
    """Without capture, nothing outside the topology answers: the sink works."""
    mesh.capture.remove(mesh.a.netns)
    listener, outcome = mesh.land(mesh.a, OUTSIDE[family], 443)
    assert listener is None
    assert outcome in ("unreachable", "refused", "timeout")


@FAMILIES
def test_excluded_outbound_port(mesh, family):
    mesh.capture.apply(mesh.a.netns, CaptureConfig(exclude_outbound_ports=(APP_PORT,)))
    dst = mesh.ip(mesh.b, family)
    assert mesh.land(mesh.a, dst, APP_PORT) == ("B:app", None)
    assert mesh.land(mesh.a, dst, OTHER_APP_PORT)[0] == "A:outbound-capture"


@FAMILIES
def test_excluded_outbound_cidr(mesh, family):
    b = mesh.ip(mesh.b, family)
    cidrs = parse_cidrs([b], "--exclude-outbound-cidrs")
    mesh.capture.apply(mesh.a.netns, CaptureConfig(exclude_outbound_cidrs=cidrs))
    assert mesh.land(mesh.a, b, APP_PORT) == ("B:app", None)
    assert mesh.land(mesh.a, OUTSIDE[family], APP_PORT)[0] == "A:outbound-capture"


@FAMILIES
def test_excluded_inbound_port(mesh, family):
    mesh.capture.apply(mesh.a.netns, CaptureConfig(exclude_inbound_ports=(APP_PORT,)))
    a = mesh.ip(mesh.a, family)
    assert mesh.land(mesh.b, a, APP_PORT) == ("A:app", None)
    assert mesh.land(mesh.b, a, OTHER_APP_PORT)[0] == "A:inbound-capture"


@FAMILIES
def test_include_inbound_ports_captures_only_those(mesh, family):
    mesh.capture.apply(mesh.a.netns, CaptureConfig(include_inbound_ports=(OTHER_APP_PORT,)))
    a = mesh.ip(mesh.a, family)
    expected = ("A:inbound-capture", mesh.inbound_original(a, OTHER_APP_PORT))
    assert mesh.land(mesh.b, a, OTHER_APP_PORT) == expected
    assert mesh.land(mesh.b, a, APP_PORT) == ("A:app", None)


@FAMILIES
def test_remove_stops_capture(mesh, family):
    mesh.capture.apply(mesh.a.netns, CaptureConfig())
    mesh.capture.remove(mesh.a.netns)
    dst = mesh.ip(mesh.b, family)
    assert mesh.land(mesh.a, dst, APP_PORT) == ("B:app", None)


@FAMILIES
def test_loopback_to_own_pod_address_stays_in_the_pod(captured, family):
    """Neither mode captures a pod talking to itself by its own address."""
    own = captured.ip(captured.a, family)
    assert captured.land(captured.a, own, APP_PORT) == ("A:app", None)


def test_self_check_sees_capture(captured):
    verdicts = verify(captured.a.netns)
    assert [(v.family, v.captured) for v in verdicts] == [(4, True), (6, True)], verdicts


def test_self_check_sees_missing_capture(mesh):
    mesh.capture.remove(mesh.a.netns)
    verdicts = verify(mesh.a.netns, timeout=1.0)
    assert [(v.family, v.captured) for v in verdicts] == [(4, False), (6, False)], verdicts
