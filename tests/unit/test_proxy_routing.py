"""Resolving an original destination, and ordering endpoints for a connection."""

from __future__ import annotations

from node_agent.proxy.model import MeshSnapshot, Service, ServicePort, Workload
from node_agent.proxy.routing import (
    Balancing,
    Endpoint,
    EndpointPicker,
    MeshRoute,
    Passthrough,
    RouteCache,
    resolve,
)

B1 = Workload("u1", "b1", "default", "b", "node-2", ("10.244.2.2", "fd00::2"))
B2 = Workload("u2", "b2", "default", "b", "node-3", ("10.244.3.2",))
SVC = Service(
    "b",
    "default",
    ("10.96.0.10", "fd96::10"),
    (ServicePort(80, 8080),),
    ("default/b1", "default/b2", "default/gone"),
)
SNAP = MeshSnapshot(
    "cluster.local", ("pem",), workloads={B1.key: B1, B2.key: B2}, services={SVC.key: SVC}
)


def test_the_route_cache_answers_as_resolve_until_the_snapshot_changes():
    cache = RouteCache(limit=2)
    first = cache.resolve(SNAP, "10.96.0.10", 80)
    assert first == resolve(SNAP, "10.96.0.10", 80)
    assert cache.resolve(SNAP, "10.96.0.10", 80) is first  # kept, not resolved again
    # A new snapshot (b2 gone): the kept answer would send traffic to a pod that left.
    without_b2 = MeshSnapshot(
        "cluster.local", ("pem",), workloads={B1.key: B1}, services=SNAP.services
    )
    route = cache.resolve(without_b2, "10.96.0.10", 80)
    assert isinstance(route, MeshRoute)
    assert [e.address for e in route.endpoints] == ["10.244.2.2"]
    # Full (pass-through destinations are the client's to pick): it starts over, still right.
    for port in range(1000, 1010):
        assert cache.resolve(without_b2, "203.0.113.7", port) == Passthrough("203.0.113.7", port)
    assert cache.resolve(without_b2, "10.96.0.10", 80) == route


def test_vip_resolves_to_endpoints_on_target_port():
    route = resolve(SNAP, "10.96.0.10", 80)
    assert isinstance(route, MeshRoute)
    assert route.service is SVC
    assert [(e.workload.name, e.address, e.port) for e in route.endpoints] == [
        ("b1", "10.244.2.2", 8080),
        ("b2", "10.244.3.2", 8080),
    ]


def test_ipv6_vip_uses_ipv6_endpoints_only():
    route = resolve(SNAP, "fd96:0::10", 80)  # not canonical: still found
    assert isinstance(route, MeshRoute)
    assert [e.address for e in route.endpoints] == ["fd00::2"]


def test_unknown_service_port_passes_through():
    assert resolve(SNAP, "10.96.0.10", 443) == Passthrough("10.96.0.10", 443)


def test_pod_ip_is_one_endpoint_as_dialed():
    route = resolve(SNAP, "10.244.3.2", 9000)
    assert route == MeshRoute(None, (Endpoint(B2, "10.244.3.2", 9000),))


def test_outside_the_mesh_passes_through():
    assert resolve(SNAP, "203.0.113.7", 443) == Passthrough("203.0.113.7", 443)


E1, E2, E3 = (Endpoint(B1, f"10.0.0.{i}", 80) for i in (1, 2, 3))


def test_round_robin_rotates():
    picker = EndpointPicker()
    firsts = [picker.order([E1, E2, E3])[0] for _ in range(4)]
    assert firsts == [E1, E2, E3, E1]


def test_failed_endpoint_sits_out_then_returns():
    now = [100.0]
    picker = EndpointPicker(eject_seconds=5, clock=lambda: now[0])
    picker.failed(E1)
    for _ in range(3):
        assert picker.order([E1, E2])[-1] == E1
    now[0] += 6
    assert {picker.order([E1, E2])[0] for _ in range(2)} == {E1, E2}


def test_all_failed_are_still_tried():
    picker = EndpointPicker()
    picker.failed(E1)
    picker.failed(E2)
    assert sorted(e.address for e in picker.order([E1, E2])) == ["10.0.0.1", "10.0.0.2"]


def test_least_request_prefers_idle_endpoints():
    picker = EndpointPicker(Balancing.LEAST_REQUEST)
    picker.started(E1)
    picker.started(E1)
    picker.started(E2)
    assert [picker.order([E1, E2, E3])[0] for _ in range(3)] == [E3, E3, E3]
    picker.finished(E1)
    picker.finished(E1)
    assert picker.order([E1, E2, E3])[:2] in ([E1, E3], [E3, E1])


def test_success_clears_ejection():
    picker = EndpointPicker()
    picker.failed(E1)
    picker.started(E1)
    picker.finished(E1)
    assert picker.order([E2, E1])[0] == E2
    assert picker.order([E2, E1])[0] == E1
