"""Cluster objects -> MeshConfig (pure: plain dicts in, as the API server sends them).

- Workloads: every pod in the mesh (weir_common.kubernetes.outside_mesh),
  with its uid, service account, node, status.podIPs, labels and the mTLS
  mode its PeerAuthentications give it.
- Services: endpoints come from EndpointSlices (what kube-proxy routes to,
  with readiness, and named target ports already resolved per endpoint). An
  endpoint counts when its targetRef is a pod in the mesh and it is ready;
  when none is, serving-and-terminating ones count, as kube-proxy does. A
  service with no endpoint in the mesh is left out, so the proxy passes
  connections to it through instead of failing them for want of an endpoint.
  Only TCP ports are carried. The proto has one target port per service port,
  so when endpoints resolve a named targetPort differently (mid-rollout), the
  largest group of endpoints that agree is used.
- Policies: AuthorizationPolicy objects, same checks as the local YAML.
- Nodes: none. MeshConfig.nodes holds bootstrap-token nodes, and Kubernetes
  nodes prove who they are by TokenReview instead; what each node is sent
  follows from the workloads' nodeName.

An object the API server let through but that is not valid (a custom
resource created before its schema tightened) is left out and reported in
Translation.skipped; it never stops the rest from being used.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from controlplane.config_file import (
    ConfigError,
    parse_authorization_policy_spec,
    parse_peer_authentication_spec,
)
from controlplane.mesh import MeshConfig, ServiceConfig, selects
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.kubernetes import outside_mesh
from weir_common.mesh import resource_name

Object = Mapping[str, Any]
AUTHORIZATION_POLICY: Final = "AuthorizationPolicy"
PEER_AUTHENTICATION: Final = "PeerAuthentication"
# EndpointSlices name their service with this label.
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
DEFAULT_SERVICE_ACCOUNT: Final = "default"


@dataclass(frozen=True)
class ClusterObjects:
    """The cached objects; namespaces by name, the others by "<namespace>/<name>"."""

    namespaces: Mapping[str, Object] = field(default_factory=dict)
    pods: Mapping[str, Object] = field(default_factory=dict)
    services: Mapping[str, Object] = field(default_factory=dict)
    endpoint_slices: Mapping[str, Object] = field(default_factory=dict)
    authorization_policies: Mapping[str, Object] = field(default_factory=dict)
    peer_authentications: Mapping[str, Object] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    kind: str
    name: str  # "<namespace>/<name>"
    reason: str


@dataclass(frozen=True)
class Translation:
    mesh: MeshConfig
    skipped: tuple[Skipped, ...]


def translate(objects: ClusterObjects, trust_domain: str) -> Translation:
    skipped: list[Skipped] = []
    modes = _peer_authentications(objects.peer_authentications, skipped)
    workloads = {}
    for pod in objects.pods.values():
        namespace = _meta(pod).get("namespace", "")
        if outside_mesh(pod, objects.namespaces.get(namespace)) is None:
            workload = _workload(pod, modes.get(namespace, ()))
            workloads[resource_name(workload.namespace, workload.name)] = workload
    slices_by_service: dict[str, list[Object]] = {}
    for endpoint_slice in objects.endpoint_slices.values():
        meta = _meta(endpoint_slice)
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            key = resource_name(meta.get("namespace", ""), service)
            slices_by_service.setdefault(key, []).append(endpoint_slice)
    services = {}
    for key, service in objects.services.items():
        config = _service(service, slices_by_service.get(key, ()), workloads)
        if config is not None:
            services[key] = config
    policies = {}
    for key, policy in objects.authorization_policies.items():
        meta = _meta(policy)
        try:
            policies[key] = parse_authorization_policy_spec(
                policy.get("spec"),
                source=f"{AUTHORIZATION_POLICY} {key}",
                namespace=meta.get("namespace", ""),
                name=meta.get("name", ""),
                trust_domain=trust_domain,
            )
        except ConfigError as exc:
            skipped.append(Skipped(AUTHORIZATION_POLICY, key, str(exc)))
    mesh = MeshConfig(
        trust_domain=trust_domain,
        nodes={},
        workloads=workloads,
        services=services,
        policies=policies,
        status_from_source=True,
    )
    return Translation(mesh, tuple(sorted(skipped, key=lambda s: (s.kind, s.name))))


def _meta(obj: Object) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _string_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


# -- mTLS mode -----------------------------------------------------------------

# (selector, mode, age key); an empty selector is namespace-wide.
_Mode = tuple[dict[str, str], "mesh_pb2.MtlsMode.ValueType", tuple[datetime.datetime, str]]


def _peer_authentications(
    objects: Mapping[str, Object], skipped: list[Skipped]
) -> dict[str, tuple[_Mode, ...]]:
    """Per namespace, its valid PeerAuthentications, oldest first (ties: by name)."""
    by_namespace: dict[str, list[_Mode]] = {}
    for key, obj in objects.items():
        meta = _meta(obj)
        try:
            selector, mode = parse_peer_authentication_spec(
                obj.get("spec"), source=f"{PEER_AUTHENTICATION} {key}"
            )
            created = _timestamp(meta.get("creationTimestamp"))
        except ConfigError as exc:
            skipped.append(Skipped(PEER_AUTHENTICATION, key, str(exc)))
            continue
        age = (created, str(meta.get("name", "")))
        by_namespace.setdefault(str(meta.get("namespace", "")), []).append((selector, mode, age))
    return {ns: tuple(sorted(modes, key=lambda m: m[2])) for ns, modes in by_namespace.items()}


def _timestamp(value: object) -> datetime.datetime:
    try:
        if isinstance(value, str):
            parsed = datetime.datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed
    except ValueError:
        pass
    raise ConfigError("metadata", "creationTimestamp", f"{value!r} is not an RFC 3339 time")


def mtls_mode(modes: Iterable[_Mode], labels: Mapping[str, str]) -> mesh_pb2.MtlsMode.ValueType:
    """The oldest matching selector's mode, else the oldest namespace-wide one, else STRICT."""
    ordered = list(modes)
    for selector, mode, _ in ordered:
        if selector and selects(selector, labels):
            return mode
    for selector, mode, _ in ordered:
        if not selector:
            return mode
    return mesh_pb2.STRICT


# -- workloads -----------------------------------------------------------------


def _workload(pod: Object, modes: Iterable[_Mode]) -> mesh_pb2.Workload:
    meta, spec = _meta(pod), pod.get("spec") or {}
    labels = _string_map(meta.get("labels"))
    return mesh_pb2.Workload(
        uid=str(meta.get("uid", "")),
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")),
        service_account=str(spec.get("serviceAccountName") or DEFAULT_SERVICE_ACCOUNT),
        node=str(spec.get("nodeName", "")),
        ips=pod_ips(pod),
        labels=labels,
        captured=True,
        mtls_mode=mtls_mode(modes, labels),
    )


def pod_ips(pod: Object) -> list[str]:
    """status.podIPs (else status.podIP) in canonical form; what does not parse is left out."""
    status = pod.get("status") or {}
    raw = [entry.get("ip") for entry in status.get("podIPs") or () if isinstance(entry, Mapping)]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    ips: list[str] = []
    for text in raw:
        try:
            ip = str(ipaddress.ip_address(str(text)))
        except ValueError:
            continue
        if ip not in ips:
            ips.append(ip)
    return ips


# -- services ------------------------------------------------------------------


def _service(
    service: Object,
    slices: Iterable[Object],
    workloads: Mapping[str, mesh_pb2.Workload],
) -> ServiceConfig | None:
    meta, spec = _meta(service), service.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    ports = [
        p
        for p in spec.get("ports") or ()
        if isinstance(p, Mapping) and p.get("protocol", "TCP") == "TCP" and _port(p.get("port"))
    ]
    if not ports:
        return None
    endpoints = _endpoints(ports, slices, namespace, workloads)
    if not endpoints:
        return None
    # Every endpoint of the largest agreeing group has the same target ports.
    groups = Counter(endpoints.values())
    targets, _ = min(groups.items(), key=lambda item: (-item[1], item[0]))
    vips = []
    for text in spec.get("clusterIPs") or [spec.get("clusterIP")]:
        try:
            vips.append(str(ipaddress.ip_address(str(text))))
        except ValueError:
            continue  # "None" (headless), or absent
    message = mesh_pb2.Service(
        name=name,
        namespace=namespace,
        vips=vips,
        ports=[
            mesh_pb2.ServicePort(name=str(p.get("name", "")), port=p["port"], target_port=target)
            for p, target in zip(ports, targets, strict=True)
        ],
        endpoints=sorted(key for key, t in endpoints.items() if t == targets),
    )
    return ServiceConfig(message, _string_map(spec.get("selector")))


def _port(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    return None


def _endpoints(
    ports: list[Mapping[str, Any]],
    slices: Iterable[Object],
    namespace: str,
    workloads: Mapping[str, mesh_pb2.Workload],
) -> dict[str, tuple[int, ...]]:
    """Meshed workload key -> its target port for each of `ports` (ready ones, else serving)."""
    ready: dict[str, tuple[int, ...]] = {}
    serving: dict[str, tuple[int, ...]] = {}
    for endpoint_slice in slices:
        slice_ports = {
            str(p.get("name") or ""): p.get("port")
            for p in endpoint_slice.get("ports") or ()
            if isinstance(p, Mapping) and p.get("protocol", "TCP") == "TCP"
        }
        targets = _target_ports(ports, slice_ports)
        if targets is None:
            continue
        for endpoint in endpoint_slice.get("endpoints") or ():
            ref = endpoint.get("targetRef") or {}
            if ref.get("kind") != "Pod":
                continue
            key = resource_name(str(ref.get("namespace") or namespace), str(ref.get("name", "")))
            workload = workloads.get(key)
            if workload is None or (ref.get("uid") and ref["uid"] != workload.uid):
                continue
            conditions = endpoint.get("conditions") or {}
            # The API: a nil `ready` is an unknown state, to be taken as ready.
            if conditions.get("ready") is not False:
                ready[key] = targets
            elif conditions.get("serving") and conditions.get("terminating"):
                serving[key] = targets
    return ready or serving


def _target_ports(
    ports: list[Mapping[str, Any]], slice_ports: Mapping[str, object]
) -> tuple[int, ...] | None:
    """The numeric target port of each service port for this slice's endpoints, or None."""
    targets = []
    for port in ports:
        target = _port(port.get("targetPort", port["port"]))
        if target is None:
            # Named: the endpoint controller resolved it for this slice's
            # endpoints, under the service port's name.
            target = _port(slice_ports.get(str(port.get("name") or "")))
            if target is None:
                return None
        targets.append(target)
    return tuple(targets)
