"""The mesh's names as both sides speak them: resource types, resource names, identities.

The control plane builds resources of these types and the node subscribes to
them; a SPIFFE ID names a workload's identity in certificates and policies.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Final

from google.protobuf.message import Message

from weir_common._generated.weir.v1 import mesh_pb2

TYPE_URL_PREFIX: Final = "type.googleapis.com/"
WORKLOAD_TYPE: Final = TYPE_URL_PREFIX + "weir.v1.Workload"
SERVICE_TYPE: Final = TYPE_URL_PREFIX + "weir.v1.Service"
POLICY_TYPE: Final = TYPE_URL_PREFIX + "weir.v1.AuthorizationPolicy"
TRUST_BUNDLE_TYPE: Final = TYPE_URL_PREFIX + "weir.v1.TrustBundle"
# Order in which a node agent subscribes: what it needs to route before what
# refers to it.
RESOURCE_TYPES: Final = (TRUST_BUNDLE_TYPE, WORKLOAD_TYPE, SERVICE_TYPE, POLICY_TYPE)
TRUST_BUNDLE_NAME: Final = "trust-bundle"

_SPIFFE_RE: Final = re.compile(
    r"spiffe://(?P<td>[a-z0-9.\-_]+)/ns/(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
    r"/sa/(?P<sa>[a-z0-9]([-a-z0-9.]*[a-z0-9])?)"
)


def resource_name(namespace: str, name: str) -> str:
    """Name of a namespaced resource (Workload, Service, AuthorizationPolicy)."""
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, text: str) -> "SpiffeId | None":
        """The workload identity `text` names, or None if it is not one."""
        match = _SPIFFE_RE.fullmatch(text)
        if match is None:
            return None
        return cls(match["td"], match["ns"], match["sa"])

    def __str__(self) -> str:
        return self.uri

    @cached_property
    def uri(self) -> str:
        # Cached: the proxy names identities in metrics and logs on every connection.
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


# What each resource type decodes to.
MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = {
    WORKLOAD_TYPE: mesh_pb2.Workload,
    SERVICE_TYPE: mesh_pb2.Service,
    POLICY_TYPE: mesh_pb2.AuthorizationPolicy,
    TRUST_BUNDLE_TYPE: mesh_pb2.TrustBundle,
}

# gRPC metadata carrying a node's bearer token on every call to the control plane.
AUTHORIZATION_METADATA: Final = "authorization"
BEARER_PREFIX: Final = "Bearer "


def auth_metadata(token: str) -> tuple[tuple[str, str]]:
    return ((AUTHORIZATION_METADATA, BEARER_PREFIX + token),)
