"""The unary gRPC services: certificate signing and local workload registration."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import grpc

from controlplane import metrics as m
from controlplane.auth import NodeAuthenticator, RequestRefusedError, authorize_identity
from controlplane.ca import CertificateAuthority
from controlplane.state import MeshState
from weir_common._generated.weir.v1 import ca_pb2, ca_pb2_grpc, registry_pb2, registry_pb2_grpc
from weir_common.log_limit import LogLimiter

log = logging.getLogger(__name__)


class CertificateService(ca_pb2_grpc.CertificateAuthorityServicer):
    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: NodeAuthenticator,
        state: MeshState,
        metrics: m.Metrics,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self._ca = ca
        self._authenticator = authenticator
        self._state = state
        self._metrics = metrics
        # A node (or anyone holding a token) can repeat a refused request at will.
        self._refusals = LogLimiter()
        self._clock = clock

    async def SignCertificate(  # noqa: N802 (gRPC method name)
        self,
        request: ca_pb2.SignCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ca_pb2.SignCertificateResponse:
        node = "<unauthenticated>"
        try:
            node = await self._authenticator.authenticate(context.invocation_metadata() or ())
            identity = authorize_identity(self._state.mesh, node, request.spiffe_id)
            ttl = (
                datetime.timedelta(seconds=request.validity_seconds)
                if request.validity_seconds
                else None
            )
            chain = self._ca.sign(request.csr_pem, identity, ttl=ttl, now=self._clock())
        except RequestRefusedError as refusal:
            self._metrics.inc(m.CERTS_REFUSED, reason=refusal.reason)
            self._refusals.log(
                log,
                logging.WARNING,
                ("certificate", node, refusal.reason),
                "refused certificate to node %s: %s",
                node,
                refusal.message,
            )
            await context.abort(refusal.code, refusal.message)
        self._metrics.inc(m.CERTS_SIGNED)
        log.info("signed %s for node %s", identity, node)
        return ca_pb2.SignCertificateResponse(
            certificate_chain_pem=chain, trust_bundle_pem=self._ca.trust_bundle_pem
        )


class RegistryService(registry_pb2_grpc.WorkloadRegistryServicer):
    def __init__(
        self, authenticator: NodeAuthenticator, state: MeshState, metrics: m.Metrics
    ) -> None:
        self._authenticator = authenticator
        self._state = state
        self._metrics = metrics
        # A node (or anyone holding a token) can repeat a refused request at will.
        self._refusals = LogLimiter()

    async def RegisterWorkload(  # noqa: N802 (gRPC method name)
        self,
        request: registry_pb2.RegisterWorkloadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> registry_pb2.RegisterWorkloadResponse:
        await self._run(
            context,
            "register",
            lambda node: self._state.register(
                node, request.namespace, request.name, request.uid, request.ips
            ),
        )
        return registry_pb2.RegisterWorkloadResponse()

    async def DeregisterWorkload(  # noqa: N802 (gRPC method name)
        self,
        request: registry_pb2.DeregisterWorkloadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> registry_pb2.DeregisterWorkloadResponse:
        await self._run(
            context,
            "deregister",
            lambda node: self._state.deregister(node, request.namespace, request.name, request.uid),
        )
        return registry_pb2.DeregisterWorkloadResponse()

    async def _run(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        operation: str,
        change: Callable[[str], None],
    ) -> None:
        node = "<unauthenticated>"
        try:
            node = await self._authenticator.authenticate(context.invocation_metadata() or ())
            change(node)
        except RequestRefusedError as refusal:
            self._metrics.inc(m.REGISTRATIONS_REFUSED, reason=refusal.reason)
            self._refusals.log(
                log,
                logging.WARNING,
                (operation, node, refusal.reason),
                "refused %s from node %s: %s",
                operation,
                node,
                refusal.message,
            )
            await context.abort(refusal.code, refusal.message)
        self._metrics.inc(m.REGISTRATIONS, operation=operation)
