"""From the mesh config and local registrations to xDS resources (pure).

A Snapshot is immutable: every resource is serialized once, with a content
version and the set of nodes it is meant for, and shared by every stream that
sends it. Rebuilding reuses the entries of the previous snapshot whose bytes
did not change, so a diff between two snapshots is cheap and exact.
"""

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from controlplane.mesh import MeshConfig, selects
from weir_common import xds_transport
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.mesh import (
    POLICY_TYPE,
    RESOURCE_TYPES,
    SERVICE_TYPE,
    TRUST_BUNDLE_NAME,
    TRUST_BUNDLE_TYPE,
    WORKLOAD_TYPE,
)


@dataclass(frozen=True)
class Registration:
    """What a node reported about a pod it enrolled (local mode)."""

    node: str
    uid: str
    ips: tuple[str, ...]

    def dump(self) -> dict[str, Any]:
        return {"node": self.node, "uid": self.uid, "ips": list(self.ips)}


@dataclass(frozen=True, eq=False)
class Entry:
    """One resource, encoded once."""

    name: str
    version: str
    payload: bytes  # the message, deterministically serialized
    fragment: bytes  # the resource as a DeltaDiscoveryResponse fragment
    # Nodes this resource is sent to; None means every node.
    audience: frozenset[str] | None
    message: Message

    def visible_to(self, node: str) -> bool:
        return self.audience is None or node in self.audience

    def dump(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "audience": None if self.audience is None else sorted(self.audience),
            "resource": json_format.MessageToDict(self.message, preserving_proto_field_name=True),
        }


@dataclass(frozen=True)
class Snapshot:
    generation: int
    created_at: float  # time.monotonic() when built, for push latency
    resources: Mapping[str, Mapping[str, Entry]]  # type URL -> name -> entry

    def view(self, type_url: str) -> Mapping[str, Entry]:
        return self.resources.get(type_url, {})

    def dump(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "resources": {
                type_url: {name: entry.dump() for name, entry in sorted(entries.items())}
                for type_url, entries in self.resources.items()
            },
        }


EMPTY = Snapshot(0, 0.0, {type_url: {} for type_url in RESOURCE_TYPES})


def build_snapshot(
    mesh: MeshConfig,
    registrations: Mapping[str, Registration],
    trust_bundle_pem: Iterable[str],
    *,
    previous: Snapshot,
    now: float,
) -> Snapshot:
    """The resources every node should have, reusing `previous` where unchanged."""
    workloads = {
        name: _registered(workload, registrations.get(name), mesh.status_from_source)
        for name, workload in mesh.workloads.items()
    }
    nodes_by_namespace: dict[str, list[mesh_pb2.Workload]] = defaultdict(list)
    for workload in mesh.workloads.values():
        nodes_by_namespace[workload.namespace].append(workload)
    policies = {
        name: (
            policy,
            frozenset(
                w.node
                for w in nodes_by_namespace[policy.namespace]
                if selects(policy.selector, w.labels)
            ),
        )
        for name, policy in mesh.policies.items()
    }
    bundle = mesh_pb2.TrustBundle(
        trust_domain=mesh.trust_domain, root_certificates_pem=list(trust_bundle_pem)
    )
    built: dict[str, dict[str, tuple[Message, frozenset[str] | None]]] = {
        TRUST_BUNDLE_TYPE: {TRUST_BUNDLE_NAME: (bundle, None)},
        WORKLOAD_TYPE: {name: (w, None) for name, w in workloads.items()},
        SERVICE_TYPE: {name: (s.service, None) for name, s in mesh.services.items()},
        POLICY_TYPE: dict(policies.items()),
    }
    resources = {
        type_url: {
            name: _entry(type_url, name, message, audience, previous.view(type_url).get(name))
            for name, (message, audience) in messages.items()
        }
        for type_url, messages in built.items()
    }
    return Snapshot(previous.generation + 1, now, resources)


def changed_names(old: Snapshot, new: Snapshot) -> dict[str, frozenset[str]]:
    """Per type URL, the names added, removed or changed (content or audience)."""
    changes = {}
    for type_url in old.resources.keys() | new.resources.keys():
        before, after = old.view(type_url), new.view(type_url)
        changes[type_url] = frozenset(
            name for name in before.keys() | after.keys() if before.get(name) is not after.get(name)
        )
    return changes


def _registered(
    workload: mesh_pb2.Workload, registration: Registration | None, status_from_source: bool
) -> mesh_pb2.Workload:
    # A registration from a node the pod is no longer declared on is stale.
    if registration is None or registration.node != workload.node:
        return workload
    # The API server's status is the same on every replica; a registration
    # (held by one replica only) just bridges the time until it is reported.
    if status_from_source and (workload.ips or registration.uid != workload.uid):
        return workload
    merged = mesh_pb2.Workload()
    merged.CopyFrom(workload)
    merged.uid = registration.uid
    del merged.ips[:]
    merged.ips.extend(registration.ips)
    return merged


def _entry(
    type_url: str,
    name: str,
    message: Message,
    audience: frozenset[str] | None,
    previous: Entry | None,
) -> Entry:
    payload = message.SerializeToString(deterministic=True)
    if previous is not None and previous.payload == payload and previous.audience == audience:
        return previous
    version = hashlib.sha256(payload).hexdigest()[:16]
    packed = any_pb2.Any(type_url=type_url, value=payload)
    return Entry(
        name=name,
        version=version,
        payload=payload,
        fragment=xds_transport.encode_resource_fragment(name, version, packed),
        audience=audience,
        message=message,
    )
