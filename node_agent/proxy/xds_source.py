"""The mesh snapshot fed by the control plane's delta xDS subscription.

The xDS client hands over the full state of one resource type at a time;
this keeps the latest of each type and publishes a new MeshSnapshot after
every accepted change, once every type has arrived: the proxy starts serving
pods on its first snapshot, so that one must be the whole mesh (the control
plane sends a type's first push only once a large one split in parts is
through), and without a trust bundle no peer could be verified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

from google.protobuf.message import Message

from node_agent.controlplane_access import ConfigHandler, check_pem_roots
from node_agent.proxy.model import (
    Action,
    AuthorizationPolicy,
    MeshSnapshot,
    MtlsMode,
    Rule,
    Service,
    ServicePort,
    Workload,
)
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.errors import InvalidInputError
from weir_common.mesh import (
    POLICY_TYPE,
    RESOURCE_TYPES,
    SERVICE_TYPE,
    TRUST_BUNDLE_NAME,
    TRUST_BUNDLE_TYPE,
    WORKLOAD_TYPE,
)

_MTLS: Final = {mesh_pb2.PERMISSIVE: MtlsMode.PERMISSIVE}  # anything else: STRICT
_ACTIONS: Final = {mesh_pb2.ALLOW: Action.ALLOW, mesh_pb2.DENY: Action.DENY}


def workload_from_proto(w: mesh_pb2.Workload) -> Workload:
    return Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        service_account=w.service_account,
        node=w.node,
        ips=tuple(w.ips),
        labels=dict(w.labels),
        captured=w.captured,
        mtls_mode=_MTLS.get(w.mtls_mode, MtlsMode.STRICT),
    )


def service_from_proto(s: mesh_pb2.Service) -> Service:
    return Service(
        name=s.name,
        namespace=s.namespace,
        vips=tuple(s.vips),
        ports=tuple(ServicePort(p.port, p.target_port, p.name) for p in s.ports),
        endpoints=tuple(s.endpoints),
    )


def policy_from_proto(p: mesh_pb2.AuthorizationPolicy) -> AuthorizationPolicy:
    action = _ACTIONS.get(p.action)
    if action is None:
        raise InvalidInputError(f"policy {p.namespace}/{p.name} has no action")
    return AuthorizationPolicy(
        name=p.name,
        namespace=p.namespace,
        action=action,
        rules=tuple(
            Rule(
                source_principals=tuple(r.source_principals),
                source_namespaces=tuple(r.source_namespaces),
                source_ip_blocks=tuple(r.source_ip_blocks),
                destination_ports=tuple(r.destination_ports),
            )
            for r in p.rules
        ),
        selector=dict(p.selector),
    )


class SnapshotHandler:
    """An xDS ConfigHandler that turns accepted resources into MeshSnapshots.

    A push is accepted only once the snapshot it makes has been fully checked
    and published; until then nothing of it is kept. A NACK must mean the proxy
    runs on the previous config, so if publishing fails anyway the previous
    snapshot is published again before the push is rejected.
    """

    def __init__(self, publish: Callable[[MeshSnapshot], None]) -> None:
        self._publish = publish
        self._state: dict[str, Mapping[str, Message]] = {}
        self._published: MeshSnapshot | None = None

    def apply(
        self,
        type_url: str,
        resources: Mapping[str, Message],
        updated: Sequence[str],  # noqa: ARG002 - the full state is enough here
        removed: Sequence[str],  # noqa: ARG002
    ) -> None:
        proposed = {**self._state, type_url: dict(resources)}
        snapshot = _build(proposed)  # raises InvalidInputError: the xDS client NACKs
        if snapshot is not None:
            self._deliver(snapshot)
        elif self._published is not None:
            raise InvalidInputError("mesh config rejected: it removes the trust bundle")
        self._state = proposed

    def _deliver(self, snapshot: MeshSnapshot) -> None:
        try:
            self._publish(snapshot)
        except Exception as e:
            # The consumer may have taken part of it (the proxy swaps its
            # snapshot in before it rebuilds TLS contexts from it).
            if self._published is not None:
                self._publish(self._published)
            raise InvalidInputError(
                f"mesh config not applied: {type(e).__name__}: {e}; the previous one stays"
            ) from e
        self._published = snapshot


def _build(state: Mapping[str, Mapping[str, Message]]) -> MeshSnapshot | None:
    """The snapshot `state` makes, None while a type is missing; checked in full either
    way, so that nothing unusable is kept while waiting for the rest."""
    found = state.get(TRUST_BUNDLE_TYPE, {}).get(TRUST_BUNDLE_NAME)
    bundle = found if isinstance(found, mesh_pb2.TrustBundle) else None
    try:
        if bundle is not None:
            _check_trust_bundle(bundle)
        workloads = {
            k: workload_from_proto(m)
            for k, m in state.get(WORKLOAD_TYPE, {}).items()
            if isinstance(m, mesh_pb2.Workload)
        }
        services = {
            k: service_from_proto(m)
            for k, m in state.get(SERVICE_TYPE, {}).items()
            if isinstance(m, mesh_pb2.Service)
        }
        policies = {
            k: policy_from_proto(m)
            for k, m in state.get(POLICY_TYPE, {}).items()
            if isinstance(m, mesh_pb2.AuthorizationPolicy)
        }
        snapshot = MeshSnapshot(
            trust_domain=bundle.trust_domain if bundle is not None else "",
            trust_bundle_pem=tuple(bundle.root_certificates_pem) if bundle is not None else (),
            workloads=workloads,
            services=services,
            policies=policies,
        )
        snapshot.check()
    except ValueError as e:
        raise InvalidInputError(f"mesh config rejected: {e}") from e
    if bundle is None or any(type_url not in state for type_url in RESOURCE_TYPES):
        return None
    return snapshot


def _check_trust_bundle(bundle: mesh_pb2.TrustBundle) -> None:
    """What the proxy will do with the bundle (TLS roots), tried now: ValueError if it fails."""
    if not bundle.trust_domain:
        raise ValueError("trust bundle without a trust domain")
    if not bundle.root_certificates_pem:
        raise ValueError("trust bundle without root certificates")
    for i, pem in enumerate(bundle.root_certificates_pem, 1):
        check_pem_roots(pem, f"trust bundle root {i}")
    # The proxy loads them concatenated: a root without its final newline
    # would spoil the next one.
    check_pem_roots("".join(bundle.root_certificates_pem), "trust bundle roots together")


class Subscription(Protocol):
    async def run(self) -> None: ...


class Subscriber(Protocol):
    """What subscribes to the mesh: node_agent.proxy.controlplane.ProxyControlPlaneClient."""

    def subscribe(self, handler: ConfigHandler) -> Subscription: ...


class XdsConfigSource:
    """ConfigSource: the node's xDS subscription to the control plane."""

    def __init__(self, client: Subscriber) -> None:
        self._client = client

    async def run(self, apply: Callable[[MeshSnapshot], None]) -> None:
        await self._client.subscribe(SnapshotHandler(apply)).run()
