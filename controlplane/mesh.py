"""The mesh as the control plane holds it: one immutable MeshConfig.

A config source (the YAML file, or the Kubernetes API) produces a whole
MeshConfig; local registrations overlay what nodes report on top of it; the
snapshot builder turns both into xDS resources. The protobuf messages held
here are never mutated after construction.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from weir_common._generated.weir.v1 import mesh_pb2


@dataclass(frozen=True)
class NodeConfig:
    name: str
    # Local mode: the secret a node agent presents. Never logged or dumped.
    bootstrap_token: str = field(repr=False)


@dataclass(frozen=True)
class ServiceConfig:
    service: mesh_pb2.Service  # endpoints resolved from `selector`
    selector: Mapping[str, str]


@dataclass(frozen=True)
class MeshConfig:
    trust_domain: str
    nodes: Mapping[str, NodeConfig]
    # Keyed by resource_name(namespace, name). Workloads carry their effective
    # mTLS mode; uid and IPs may be empty until a node registers the pod.
    workloads: Mapping[str, mesh_pb2.Workload]
    services: Mapping[str, ServiceConfig]
    policies: Mapping[str, mesh_pb2.AuthorizationPolicy]
    # True when the source itself reports each pod's uid and IPs (Kubernetes:
    # metadata.uid, status.podIPs). A node's registration must then match the
    # source's uid, and only stands in for IPs the source does not have yet,
    # so that every replica serves the same IPs once the kubelet reports them.
    status_from_source: bool = False

    def service_accounts_on(self, node: str) -> frozenset[tuple[str, str]]:
        """(namespace, service account) of every workload the config puts on `node`."""
        return frozenset(
            (w.namespace, w.service_account) for w in self.workloads.values() if w.node == node
        )

    def dump(self) -> dict[str, Any]:
        """Plain data for config_dump; bootstrap tokens are left out."""
        return {
            "trust_domain": self.trust_domain,
            "nodes": sorted(self.nodes),
            "workloads": {k: _plain(w) for k, w in sorted(self.workloads.items())},
            "services": {
                k: {**_plain(s.service), "selector": dict(s.selector)}
                for k, s in sorted(self.services.items())
            },
            "policies": {k: _plain(p) for k, p in sorted(self.policies.items())},
        }


def _plain(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a label selector (all pairs must be present) picks `labels`."""
    return all(labels.get(key) == value for key, value in selector.items())
