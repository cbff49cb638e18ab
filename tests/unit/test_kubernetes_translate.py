"""Cluster objects -> MeshConfig: membership, workloads, mTLS modes, services, policies."""

from controlplane.kubernetes.translate import ClusterObjects, translate
from weir_common._generated.weir.v1 import mesh_pb2

TD = "cluster.local"


def namespace(name, mesh="enabled"):
    labels = {"weir.dev/mesh": mesh} if mesh else {}
    return {"metadata": {"name": name, "labels": labels}}


def pod(name, ns="shop", node="n1", ips=("10.244.1.5",), labels=None, **extra):
    spec = {"nodeName": node, "serviceAccountName": extra.pop("sa", "app")}
    spec.update(extra.pop("spec", {}))
    status = {"phase": extra.pop("phase", "Running"), "podIPs": [{"ip": ip} for ip in ips]}
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{name}",
            "labels": labels if labels is not None else {"app": name},
        },
        "spec": spec,
        "status": status,
    }


def service(name, ns="shop", ports=None, cluster_ips=("10.96.0.10",), selector=None):
    spec = {
        "clusterIP": cluster_ips[0] if cluster_ips else "None",
        "clusterIPs": list(cluster_ips) or ["None"],
        "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        "selector": selector or {"app": name},
    }
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(name, svc, pods, ns="shop", ports=None, conditions=None):
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": ports or [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": ["10.244.1.5"],
                "conditions": (conditions or {}).get(p, {"ready": True}),
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p, "uid": f"uid-{p}"},
            }
            for p in pods
        ],
    }


def peer(name, mode, selector=None, ns="shop", created="2026-01-01T00:00:00Z"):
    spec = {"mode": mode}
    if selector is not None:
        spec["selector"] = selector
    return {
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
        "spec": spec,
    }


def policy(name, spec, ns="shop"):
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def keyed(*objects):
    return {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in objects}


def objects(**kinds):
    kinds.setdefault("namespaces", {"shop": namespace("shop")})
    return ClusterObjects(**kinds)


def mesh_of(**kinds):
    return translate(objects(**kinds), TD).mesh


def test_workload_carries_what_the_api_says():
    mesh = mesh_of(pods=keyed(pod("web", ips=("10.244.1.5", "fd00::5"), labels={"app": "web"})))
    assert mesh.nodes == {}
    assert mesh.status_from_source
    assert dict(mesh.workloads) == {
        "shop/web": mesh_pb2.Workload(
            uid="uid-web",
            name="web",
            namespace="shop",
            service_account="app",
            node="n1",
            ips=["10.244.1.5", "fd00::5"],
            labels={"app": "web"},
            captured=True,
            mtls_mode=mesh_pb2.STRICT,
        )
    }
    assert mesh.service_accounts_on("n1") == {("shop", "app")}


def test_service_account_defaults_and_ips_fall_back_or_are_cleaned():
    bare = pod("a", ips=())
    del bare["spec"]["serviceAccountName"]
    bare["status"]["podIP"] = "10.244.1.9"
    odd = pod("b", ips=("not-an-ip", "10.244.1.7", "10.244.1.7"))
    pending = pod("c", ips=())
    mesh = mesh_of(pods=keyed(bare, odd, pending))
    assert mesh.workloads["shop/a"].service_account == "default"
    assert list(mesh.workloads["shop/a"].ips) == ["10.244.1.9"]
    assert list(mesh.workloads["shop/b"].ips) == ["10.244.1.7"]
    assert list(mesh.workloads["shop/c"].ips) == []


def test_membership_rule():
    pods = keyed(
        pod("in"),
        pod("opted-out", labels={"weir.dev/mesh": "disabled"}),
        pod("host", spec={"hostNetwork": True}),
        pod("unscheduled", node=""),
        pod("done", phase="Succeeded"),
        pod("failed", phase="Failed"),
        pod("other-ns", ns="plain"),
        pod("no-ns", ns="gone"),
        pod("off", ns="off"),
    )
    namespaces = {
        "shop": namespace("shop"),
        "plain": namespace("plain", mesh=None),
        "off": namespace("off", mesh="disabled"),
    }
    assert set(mesh_of(pods=pods, namespaces=namespaces).workloads) == {"shop/in"}


def test_mtls_mode_precedence():
    pods = keyed(
        pod("legacy", labels={"app": "legacy"}),
        pod("web", labels={"app": "web"}),
        pod("db", ns="data", labels={"app": "db"}),
        pod("api", ns="api", labels={"app": "api"}),
    )
    peers = keyed(
        # Namespace-wide in shop: the oldest of two wins.
        peer("ns-old", "PERMISSIVE", created="2026-01-01T00:00:00Z"),
        peer("ns-new", "STRICT", created="2026-02-01T00:00:00Z"),
        # A selector beats namespace-wide even when younger; the oldest matching one wins.
        peer("legacy-b", "STRICT", {"app": "legacy"}, created="2026-03-01T00:00:00Z"),
        peer("legacy-a", "PERMISSIVE", {"app": "legacy"}, created="2026-04-01T00:00:00Z"),
        # Same age: the name that sorts first wins. An empty selector is namespace-wide.
        peer("b", "STRICT", {}, ns="data", created="2026-01-01T00:00:00Z"),
        peer("a", "PERMISSIVE", {}, ns="data", created="2026-01-01T00:00:00Z"),
    )
    namespaces = {n: namespace(n) for n in ("shop", "data", "api")}
    mesh = mesh_of(pods=pods, peer_authentications=peers, namespaces=namespaces)
    modes = {k: w.mtls_mode for k, w in mesh.workloads.items()}
    assert modes == {
        "shop/legacy": mesh_pb2.STRICT,
        "shop/web": mesh_pb2.PERMISSIVE,
        "data/db": mesh_pb2.PERMISSIVE,
        "api/api": mesh_pb2.STRICT,
    }


def test_invalid_peer_authentication_is_skipped_and_reported():
    peers = keyed(
        peer("bad-mode", "LOOSE", created="2025-01-01T00:00:00Z"),
        peer("bad-time", "PERMISSIVE", created="yesterday"),
        peer("good", "PERMISSIVE", created="2026-01-01T00:00:00Z"),
    )
    result = translate(objects(pods=keyed(pod("web")), peer_authentications=peers), TD)
    assert result.mesh.workloads["shop/web"].mtls_mode == mesh_pb2.PERMISSIVE
    assert [(s.kind, s.name) for s in result.skipped] == [
        ("PeerAuthentication", "shop/bad-mode"),
        ("PeerAuthentication", "shop/bad-time"),
    ]
    assert "LOOSE" in result.skipped[0].reason


def test_service_from_endpoint_slices():
    pods = keyed(pod("web-1"), pod("web-2"), pod("web-out", labels={"weir.dev/mesh": "disabled"}))
    mesh = mesh_of(
        pods=pods,
        services=keyed(service("web", cluster_ips=("10.96.0.10", "fd00:96::10"))),
        endpoint_slices=keyed(
            endpoint_slice("web-abc", "web", ["web-2", "web-out"]),
            endpoint_slice("web-def", "web", ["web-1"]),
        ),
    )
    config = mesh.services["shop/web"]
    assert config.selector == {"app": "web"}
    assert config.service == mesh_pb2.Service(
        name="web",
        namespace="shop",
        vips=["10.96.0.10", "fd00:96::10"],
        ports=[mesh_pb2.ServicePort(name="http", port=80, target_port=8080)],
        endpoints=["shop/web-1", "shop/web-2"],
    )


def test_named_target_port_is_resolved_by_the_slice_and_the_largest_agreeing_group_wins():
    ports = [
        {"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"},
        {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
    ]
    mesh = mesh_of(
        pods=keyed(pod("a"), pod("b"), pod("c")),
        services=keyed(service("web", ports=ports)),
        endpoint_slices=keyed(
            endpoint_slice("s1", "web", ["a", "b"], ports=[{"name": "http", "port": 9000}]),
            endpoint_slice("s2", "web", ["c"], ports=[{"name": "http", "port": 9001}]),
        ),
    )
    service_ = mesh.services["shop/web"].service
    assert list(service_.ports) == [mesh_pb2.ServicePort(name="http", port=80, target_port=9000)]
    assert list(service_.endpoints) == ["shop/a", "shop/b"]


def test_readiness_and_fallback_to_serving_terminating():
    ready_or_not = {"b": {"ready": False}, "c": {}}
    mesh = mesh_of(
        pods=keyed(pod("a"), pod("b"), pod("c")),
        services=keyed(service("web")),
        endpoint_slices=keyed(endpoint_slice("s", "web", ["a", "b", "c"], conditions=ready_or_not)),
    )
    assert list(mesh.services["shop/web"].service.endpoints) == ["shop/a", "shop/c"]
    draining = {
        "a": {"ready": False, "serving": True, "terminating": True},
        "b": {"ready": False, "serving": False, "terminating": True},
    }
    mesh = mesh_of(
        pods=keyed(pod("a"), pod("b")),
        services=keyed(service("web")),
        endpoint_slices=keyed(endpoint_slice("s", "web", ["a", "b"], conditions=draining)),
    )
    assert list(mesh.services["shop/web"].service.endpoints) == ["shop/a"]


def test_services_without_meshed_endpoints_are_left_out_and_headless_has_no_vips():
    pods = keyed(pod("web"), pod("plain", ns="plain"))
    stale = endpoint_slice("old", "old", ["web"])
    stale["endpoints"][0]["targetRef"]["uid"] = "uid-of-a-previous-pod"
    mesh = mesh_of(
        namespaces={"shop": namespace("shop"), "plain": namespace("plain", mesh=None)},
        pods=pods,
        services=keyed(
            service("headless", cluster_ips=()),
            service("plain", ns="plain"),
            service("empty"),
            service("old"),
            service("udp", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
            {"metadata": {"name": "ext", "namespace": "shop"}, "spec": {"type": "ExternalName"}},
        ),
        endpoint_slices=keyed(
            endpoint_slice("h", "headless", ["web"]),
            endpoint_slice("p", "plain", ["plain"], ns="plain"),
            stale,
            endpoint_slice("u", "udp", ["web"]),
        ),
    )
    assert set(mesh.services) == {"shop/headless"}
    assert list(mesh.services["shop/headless"].service.vips) == []


def test_authorization_policies_same_checks_as_yaml_and_no_workload_needed():
    good = policy(
        "allow",
        {
            "selector": {"app": "nothing-yet"},
            "action": "ALLOW",
            "rules": [
                {
                    "sourcePrincipals": ["spiffe://cluster.local/ns/shop/sa/web"],
                    "sourceNamespaces": ["shop"],
                    "sourceIpBlocks": ["10.244.0.0/16"],
                    "destinationPorts": [5432],
                }
            ],
        },
    )
    result = translate(
        objects(
            authorization_policies=keyed(
                good,
                policy("deny-all", {"action": "DENY"}, ns="other"),
                policy("bad-action", {"action": "MAYBE"}),
                policy("bad-port", {"action": "ALLOW", "rules": [{"destinationPorts": [0]}]}),
                policy(
                    "other-td",
                    {"action": "ALLOW", "rules": [{"sourcePrincipals": ["spiffe://x/ns/a/sa/b"]}]},
                ),
                policy("extra", {"action": "ALLOW", "unknown": 1}),
                policy("no-spec", None),
            )
        ),
        TD,
    )
    assert result.mesh.policies["shop/allow"] == mesh_pb2.AuthorizationPolicy(
        name="allow",
        namespace="shop",
        selector={"app": "nothing-yet"},
        action=mesh_pb2.ALLOW,
        rules=[
            mesh_pb2.Rule(
                source_principals=["spiffe://cluster.local/ns/shop/sa/web"],
                source_namespaces=["shop"],
                source_ip_blocks=["10.244.0.0/16"],
                destination_ports=[5432],
            )
        ],
    )
    assert result.mesh.policies["other/deny-all"].action == mesh_pb2.DENY
    assert set(result.mesh.policies) == {"shop/allow", "other/deny-all"}
    skipped = {s.name: s.reason for s in result.skipped}
    assert set(skipped) == {
        "shop/bad-action",
        "shop/bad-port",
        "shop/other-td",
        "shop/extra",
        "shop/no-spec",
    }
    assert (
        "AuthorizationPolicy shop/bad-port: spec.rules[0].destinationPorts[0]"
        in skipped["shop/bad-port"]
    )
    assert "unknown field" in skipped["shop/extra"]


def test_translation_does_not_depend_on_the_order_objects_arrived_in():
    first = mesh_of(
        pods=keyed(pod("b"), pod("a")),
        services=keyed(service("a")),
        endpoint_slices=keyed(endpoint_slice("s", "a", ["b", "a"])),
    )
    second = mesh_of(
        pods=keyed(pod("a"), pod("b")),
        services=keyed(service("a")),
        endpoint_slices=keyed(endpoint_slice("s", "a", ["a", "b"])),
    )
    assert first.dump() == second.dump()
    assert list(first.services["shop/a"].service.endpoints) == ["shop/a", "shop/b"]
    assert translate(objects(), TD).skipped == ()
