"""Capture at the traffic level: where real connections from and to a pod land.

Pods are wired by the reference CNI plugins inside a node namespace. Pod A is
captured; every connection carries a token, and the listeners it could land
on (A's proxy ports, A's app, B's app) record which token they saw. A
connection that escapes capture to an address outside the topology dies in
the underlay, never on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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
from node_agent.redirect.iptables import IptablesCapture

pytestmark = pytest.mark.netns

APP_PORT, OTHER_APP_PORT = 8080, 9090
OUTSIDE = {4: "203.0.113.7", 6: "2001:db8::7"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}


@dataclass
class Mesh:
    a: Pod
    b: Pod
    seen: TrafficObserver
    capture: IptablesCapture

    def ip(self, pod: Pod, family: int) -> str:
        return str(pod.ipv6 if family == 6 else pod.ipv4)

    def land(self, src: Pod, dst: str, port: int, **who: int) -> tuple[str | None, object]:
        """Connect and report (listener it landed on, original destination it saw)."""
        attempt = connect(src.netns, dst, port, **who)
        arrival = self.seen.wait_for(attempt.token, timeout=3)
        if arrival is None:
            return None, attempt.outcome
        assert attempt.outcome == "ok"
        return arrival.listener, arrival.original_dst


@pytest.fixture(scope="module", params=list(Backend))
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
        capture = IptablesCapture(Backend(request.param))
        try:
            yield Mesh(a, b, seen, capture)
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
    assert captured.land(captured.b, dst, APP_PORT) == ("A:inbound-capture", (dst, APP_PORT))


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
    assert mesh.land(mesh.b, a, OTHER_APP_PORT) == ("A:inbound-capture", (a, OTHER_APP_PORT))
    assert mesh.land(mesh.b, a, APP_PORT) == ("A:app", None)


@FAMILIES
def test_remove_stops_capture(mesh, family):
    mesh.capture.apply(mesh.a.netns, CaptureConfig())
    mesh.capture.remove(mesh.a.netns)
    dst = mesh.ip(mesh.b, family)
    assert mesh.land(mesh.a, dst, APP_PORT) == ("B:app", None)
