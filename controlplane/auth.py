"""Who is calling, and what a node may do (decisions are pure).

A node authenticates on every RPC with gRPC metadata
`authorization: Bearer <token>`. In local mode the token is the node's
bootstrap token from the mesh config; in Kubernetes mode it is a projected
ServiceAccount token checked by a TokenReview
(controlplane/kubernetes/tokenreview.py). Authentication is async so that an
authenticator asking the API server never blocks the event loop.
"""

import hmac
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import grpc

from controlplane.mesh import MeshConfig
from controlplane.snapshot import Registration
from weir_common.errors import WeirError
from weir_common.mesh import AUTHORIZATION_METADATA, BEARER_PREFIX, SpiffeId


class RequestRefusedError(WeirError):
    """A request the control plane refuses; carries the gRPC status to answer with.

    `reason` is a short, fixed label for metrics (never caller-controlled text).
    """

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def unauthenticated(message: str) -> RequestRefusedError:
    return RequestRefusedError(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", message)


def invalid_argument(reason: str, message: str) -> RequestRefusedError:
    return RequestRefusedError(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


class NodeAuthenticator(Protocol):
    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The node name the caller proved, or raise RequestRefusedError(UNAUTHENTICATED)."""
        ...


class BootstrapTokenAuthenticator:
    """Local mode: each node's bootstrap token, from the current mesh config."""

    def __init__(self, mesh: Callable[[], MeshConfig]) -> None:
        self._mesh = mesh

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        token = bearer_token(metadata)
        found = None
        # Compare against every node, in constant time per comparison.
        for node in self._mesh().nodes.values():
            if hmac.compare_digest(node.bootstrap_token.encode(), token.encode()):
                found = node.name
        if found is None:
            raise unauthenticated("unknown bootstrap token")
        return found


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key == AUTHORIZATION_METADATA and isinstance(value, str):
            if value.startswith(BEARER_PREFIX) and len(value) > len(BEARER_PREFIX):
                return value[len(BEARER_PREFIX) :]
            raise unauthenticated("authorization metadata is not 'Bearer <token>'")
    raise unauthenticated("no authorization metadata")


def authorize_identity(mesh: MeshConfig, node: str, requested: str) -> SpiffeId:
    """The identity `node` may obtain a certificate for, or raise RequestRefusedError."""
    spiffe = SpiffeId.parse(requested)
    if spiffe is None:
        raise invalid_argument(
            "bad_identity", f"{requested!r} is not spiffe://<trust-domain>/ns/<ns>/sa/<sa>"
        )
    if spiffe.trust_domain != mesh.trust_domain:
        raise invalid_argument(
            "bad_identity",
            f"{requested} is outside trust domain {mesh.trust_domain!r}",
        )
    if (spiffe.namespace, spiffe.service_account) not in mesh.service_accounts_on(node):
        raise RequestRefusedError(
            grpc.StatusCode.PERMISSION_DENIED,
            "not_on_node",
            f"node {node!r} hosts no workload of service account "
            f"{spiffe.namespace}/{spiffe.service_account}",
        )
    return spiffe


def authorize_registration(
    mesh: MeshConfig,
    registrations: Mapping[str, Registration],
    node: str,
    name: str,
    registration: Registration,
) -> None:
    """Whether `node` may register pod `name` ("<ns>/<name>") as `registration`."""
    workload = mesh.workloads.get(name)
    if workload is None:
        raise RequestRefusedError(
            grpc.StatusCode.NOT_FOUND, "unknown_workload", f"{name} is not in the mesh config"
        )
    if workload.node != node:
        raise RequestRefusedError(
            grpc.StatusCode.PERMISSION_DENIED,
            "not_on_node",
            f"{name} is declared on node {workload.node!r}, not on {node!r}",
        )
    if not registration.uid:
        raise invalid_argument("bad_registration", "uid is empty")
    if mesh.status_from_source and workload.uid and workload.uid != registration.uid:
        raise RequestRefusedError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "uid_mismatch",
            f"{name} has uid {workload.uid!r} in the API server, not {registration.uid!r}",
        )
    for other_name, other in registrations.items():
        clash = set(other.ips) & set(registration.ips)
        if other_name != name and clash:
            raise RequestRefusedError(
                grpc.StatusCode.ALREADY_EXISTS,
                "ip_in_use",
                f"IP {min(clash)} is registered for {other_name}",
            )
