"""The node agent's copy of the mesh, as the control plane pushes it over xDS.

It is the XdsClient's config handler: each push replaces the full state of
one resource type, is validated whole first, and is rejected whole (NACK, the
old state stays) if anything in it is unusable; nothing is kept before every
resource passed. Enrollment asks it who a pod is.
(The proxy keeps its own subscription for routing.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography import x509
from google.protobuf import json_format
from google.protobuf.message import Message

from node_agent.enrollment.enroller import MeshIntent
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.errors import InvalidInputError, TransientError
from weir_common.mesh import (
    MESSAGE_TYPES,
    POLICY_TYPE,
    RESOURCE_TYPES,
    SERVICE_TYPE,
    TRUST_BUNDLE_TYPE,
    WORKLOAD_TYPE,
)

log = logging.getLogger(__name__)


class MeshView:
    def __init__(self, node: str) -> None:
        self.node = node
        self._state: dict[str, dict[str, Message]] = {}
        # Called after every accepted push (the Kubernetes reconcile loop wakes on it).
        self.on_change: list[Callable[[], None]] = []

    @property
    def synced(self) -> bool:
        """Every resource type arrived at least once (readiness waits on this)."""
        return all(t in self._state for t in RESOURCE_TYPES)

    def apply(
        self,
        type_url: str,
        resources: Mapping[str, Message],
        updated: Sequence[str],
        removed: Sequence[str],
    ) -> None:
        _check(type_url, resources)
        self._state[type_url] = dict(resources)
        for listener in self.on_change:
            listener()
        log.info(
            "mesh config %s: %d resources (%d updated, %d removed)",
            type_url.rsplit(".", 1)[-1],
            len(resources),
            len(updated),
            len(removed),
        )

    def workloads(self) -> list[mesh_pb2.Workload]:
        return [
            w
            for w in self._state.get(WORKLOAD_TYPE, {}).values()
            if isinstance(w, mesh_pb2.Workload)
        ]

    def services(self) -> list[mesh_pb2.Service]:
        return [
            s for s in self._state.get(SERVICE_TYPE, {}).values() if isinstance(s, mesh_pb2.Service)
        ]

    def policies(self) -> list[mesh_pb2.AuthorizationPolicy]:
        values = self._state.get(POLICY_TYPE, {}).values()
        return [p for p in values if isinstance(p, mesh_pb2.AuthorizationPolicy)]

    def trust_bundle(self) -> mesh_pb2.TrustBundle | None:
        bundles = [
            b
            for b in self._state.get(TRUST_BUNDLE_TYPE, {}).values()
            if isinstance(b, mesh_pb2.TrustBundle)
        ]
        return bundles[0] if bundles else None

    def lookup(self, namespace: str, name: str) -> MeshIntent | str:
        """Enrollment's question: is this pod ours to capture, and who is it?"""
        if not self.synced:
            # Not an exclusion: the caller must retry once config has arrived.
            raise TransientError("mesh config not received from the control plane yet")
        found = next(
            (w for w in self.workloads() if (w.namespace, w.name) == (namespace, name)), None
        )
        if found is None:
            return f"{namespace}/{name} is not a workload of the mesh config"
        if found.node != self.node:
            return f"{namespace}/{name} belongs on node {found.node}, not {self.node}"
        if not found.captured:
            return f"{namespace}/{name} is configured as not captured"
        return MeshIntent(service_account=found.service_account)

    def container_workload(self, container_id: str) -> tuple[str, str] | None:
        """(namespace, name) of the workload a bare container runtime started.

        A runtime without Kubernetes (`ctr run --cni`) passes no K8S_POD_*
        arguments; in local mode its CNI container id "<namespace>-<name>"
        (containerd namespace and container name) names the workload.
        """
        for w in self.workloads():
            if f"{w.namespace}-{w.name}" == container_id:
                return w.namespace, w.name
        return None

    def dump(self) -> dict[str, Any]:
        return {
            type_url.rsplit(".", 1)[-1]: {
                name: json_format.MessageToDict(message) for name, message in sorted(res.items())
            }
            for type_url, res in sorted(self._state.items())
        }


def _check(type_url: str, resources: Mapping[str, Message]) -> None:
    message_type = MESSAGE_TYPES.get(type_url)
    if message_type is None:
        raise InvalidInputError(f"unknown resource type {type_url}")
    for name, message in resources.items():
        if not isinstance(message, message_type):
            raise InvalidInputError(
                f"{name}: a {type(message).__name__} where a {message_type.__name__} belongs"
            )
        if isinstance(message, mesh_pb2.TrustBundle):
            _check_bundle(message)
        elif isinstance(message, mesh_pb2.Workload):
            _check_workload(name, message)
    # Without one, no peer could be verified: keep the bundle we have.
    if type_url == TRUST_BUNDLE_TYPE and not resources:
        raise InvalidInputError("mesh config without a trust bundle")


def _check_workload(name: str, workload: mesh_pb2.Workload) -> None:
    # Enrollment answers from these fields; an empty one would enroll a pod
    # under no identity or match the wrong pod.
    missing = [
        field
        for field in ("namespace", "name", "node", "service_account")
        if not getattr(workload, field)
    ]
    if missing:
        raise InvalidInputError(f"workload {name} has no {', '.join(missing)}")


def _check_bundle(bundle: mesh_pb2.TrustBundle) -> None:
    if not bundle.root_certificates_pem:
        raise InvalidInputError("trust bundle without root certificates")
    for pem in bundle.root_certificates_pem:
        try:
            x509.load_pem_x509_certificate(pem.encode())
        except ValueError as e:
            raise InvalidInputError(f"trust bundle holds an unparsable certificate: {e}") from None
