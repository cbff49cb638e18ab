"""What a node agent uses to talk to the control plane.

- XdsClient: subscribes to the mesh over delta ADS, keeps the last good config,
  ACKs what its handler accepts and NACKs what it rejects (keeping the old
  config), reconnects with exponential backoff and resumes from the versions
  it holds.
- request_certificate: generates the workload key here, sends only the CSR.
- register_workload / deregister_workload: local-mode enrollment reports.
"""

import asyncio
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError, Message

from controlplane import xds_transport
from controlplane._generated.weir.v1 import (
    ca_pb2,
    ca_pb2_grpc,
    mesh_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from controlplane.auth import AUTHORIZATION_METADATA, BEARER_PREFIX
from controlplane.mesh import (
    POLICY_TYPE,
    RESOURCE_TYPES,
    SERVICE_TYPE,
    TRUST_BUNDLE_TYPE,
    WORKLOAD_TYPE,
)
from node_agent.errors import InvalidInputError

log = logging.getLogger(__name__)

MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = {
    WORKLOAD_TYPE: mesh_pb2.Workload,
    SERVICE_TYPE: mesh_pb2.Service,
    POLICY_TYPE: mesh_pb2.AuthorizationPolicy,
    TRUST_BUNDLE_TYPE: mesh_pb2.TrustBundle,
}
RPC_TIMEOUT_SECONDS: Final = 10.0


def auth_metadata(token: str) -> tuple[tuple[str, str]]:
    return ((AUTHORIZATION_METADATA, BEARER_PREFIX + token),)


class ConfigHandler(Protocol):
    def apply(
        self,
        type_url: str,
        resources: Mapping[str, Message],
        updated: Sequence[str],
        removed: Sequence[str],
    ) -> None:
        """Take the new full state of `type_url`; raise InvalidInputError to reject it."""
        ...


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures, with full jitter."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** min(failures, 32))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not crypto)


class XdsClient:
    def __init__(
        self,
        target: str,
        node: str,
        token: str,
        handler: ConfigHandler,
        *,
        types: Sequence[str] = RESOURCE_TYPES,
        backoff: Backoff = Backoff(),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._target = target
        self._node = node
        self._token = token
        self._handler = handler
        self._types = tuple(types)
        self._backoff = backoff
        self._credentials = credentials
        # type URL -> name -> (version, message): the last config the handler accepted.
        self._accepted: dict[str, dict[str, tuple[str, Message]]] = {t: {} for t in self._types}
        self.connected = asyncio.Event()
        self._delivered = False

    def versions(self, type_url: str) -> dict[str, str]:
        return {name: version for name, (version, _) in self._accepted[type_url].items()}

    def resources(self, type_url: str) -> dict[str, Message]:
        return {name: message for name, (_, message) in self._accepted[type_url].items()}

    async def run(self) -> None:
        """Stay subscribed until cancelled, reconnecting with backoff."""
        failures = 0
        while True:
            self._delivered = False
            try:
                await self._session()
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "xDS stream to %s failed: %s %s", self._target, exc.code().name, exc.details()
                )
            else:
                log.info("xDS stream to %s closed by the server", self._target)
            finally:
                self.connected.clear()
            # A stream that delivered config was healthy: start backing off afresh.
            failures = 0 if self._delivered else failures + 1
            await asyncio.sleep(self._backoff.delay(failures))

    async def _session(self) -> None:
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self._target)
        else:
            channel = grpc.aio.secure_channel(self._target, self._credentials)
        async with channel:
            call = channel.stream_stream(
                xds_transport.DELTA_METHOD,
                request_serializer=xds_transport.passthrough,
                response_deserializer=xds_transport.decode_response,
            )(None, metadata=auth_metadata(self._token))
            for type_url in self._types:
                await call.write(
                    xds_transport.encode_request(
                        node_id=self._node,
                        type_url=type_url,
                        initial_versions=self.versions(type_url),
                    )
                )
            self.connected.set()
            async for response in call:
                self._delivered = True
                await call.write(self._apply(response))

    def _apply(self, response: xds_transport.DeltaResponse) -> bytes:
        """Apply one push all or nothing; the ACK or NACK to send back."""
        type_url = response.type_url
        try:
            proposed = self._proposed(response)
            self._handler.apply(
                type_url,
                {name: message for name, (_, message) in proposed.items()},
                [r.name for r in response.resources],
                list(response.removed_resources),
            )
        except InvalidInputError as exc:
            log.warning("rejecting %s push %s: %s", type_url, response.nonce, exc.message)
            return xds_transport.encode_request(
                node_id=self._node,
                type_url=type_url,
                response_nonce=response.nonce,
                error=(grpc.StatusCode.INVALID_ARGUMENT.value[0], exc.message),
            )
        self._accepted[type_url] = proposed
        return xds_transport.encode_request(
            node_id=self._node, type_url=type_url, response_nonce=response.nonce
        )

    def _proposed(self, response: xds_transport.DeltaResponse) -> dict[str, tuple[str, Message]]:
        """The accepted state of the response's type with the response applied."""
        type_url = response.type_url
        if type_url not in self._accepted:
            raise InvalidInputError(f"not subscribed to {type_url}")
        proposed = dict(self._accepted[type_url])
        message_type = MESSAGE_TYPES[type_url]
        for resource in response.resources:
            if resource.resource.type_url != type_url:
                raise InvalidInputError(
                    f"{resource.name}: resource type {resource.resource.type_url}"
                )
            try:
                message = message_type.FromString(resource.resource.value)
            except DecodeError as exc:
                raise InvalidInputError(f"{resource.name}: undecodable: {exc}") from None
            proposed[resource.name] = (resource.version, message)
        for name in response.removed_resources:
            proposed.pop(name, None)
        return proposed


@dataclass(frozen=True)
class IssuedCertificate:
    private_key_pem: bytes = b""  # stays on this node
    chain_pem: tuple[str, ...] = ()  # leaf first
    trust_bundle_pem: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"IssuedCertificate(chain={len(self.chain_pem)} certs)"


async def request_certificate(
    channel: grpc.aio.Channel, token: str, spiffe_id: str, validity_seconds: int = 0
) -> IssuedCertificate:
    """Generate a P-256 key here and get it certified for `spiffe_id`."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
    response = await stub.SignCertificate(
        ca_pb2.SignCertificateRequest(
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
            spiffe_id=spiffe_id,
            validity_seconds=validity_seconds,
        ),
        metadata=auth_metadata(token),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    return IssuedCertificate(
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        chain_pem=tuple(response.certificate_chain_pem),
        trust_bundle_pem=tuple(response.trust_bundle_pem),
    )


async def register_workload(
    channel: grpc.aio.Channel,
    token: str,
    *,
    namespace: str,
    name: str,
    uid: str,
    ips: Iterable[str],
) -> None:
    await registry_pb2_grpc.WorkloadRegistryStub(channel).RegisterWorkload(
        registry_pb2.RegisterWorkloadRequest(namespace=namespace, name=name, uid=uid, ips=ips),
        metadata=auth_metadata(token),
        timeout=RPC_TIMEOUT_SECONDS,
    )


async def deregister_workload(
    channel: grpc.aio.Channel, token: str, *, namespace: str, name: str, uid: str
) -> None:
    await registry_pb2_grpc.WorkloadRegistryStub(channel).DeregisterWorkload(
        registry_pb2.DeregisterWorkloadRequest(namespace=namespace, name=name, uid=uid),
        metadata=auth_metadata(token),
        timeout=RPC_TIMEOUT_SECONDS,
    )
