"""The node agent's client of the control plane, on grpcio.

- ControlPlaneClient: one node's connection. It presents the node's bearer
  token on every call, signs certificates (the key is generated here, only the
  CSR is sent), registers and deregisters enrolled workloads (local mode), and
  opens the config subscription.
- XdsClient: the config subscription (controlplane_access.XdsSubscription)
  over a grpcio stream, with the registrations sent again at its start.

Where the control plane is, the token, the retry pacing and the subscription
state are in node_agent.controlplane_access, shared with the node proxy's
own client (node_agent.proxy.controlplane).

The control plane keeps registrations in memory only (it has no state of its
own, see docs/architecture.md), so the client remembers what it registered and
registers it again at the start of every xDS stream: after a control-plane
restart, the node's workloads come back without the agent doing anything. A
registration that cannot be sent now (the control plane is unreachable) is
kept as unsent and goes out with the next stream, or as soon as a stream that
is up lets it through.

Reconnecting (docs/architecture.md, "Control-plane outage"): while the
control plane cannot be reached, every attempt is paced by RECONNECT_BACKOFF,
whose 1 s ceiling bounds how long a node takes to notice the control plane is
back, however long it was gone: gRPC's own channel reconnects (which add
their +-20 % jitter) and our retries of the xDS stream and of unsent
registrations alike. Calls that fail while the channel is down fail on the
node without reaching anyone, so retrying that often costs the control plane
nothing. A control plane that answers with a refusal is another matter: those
retries reach it, and back off to REFUSED_BACKOFF's 30 s. A node that held
config registers its pods again at once but takes config only
RESUME_SETTLE_SECONDS later, so that a restarted control plane has heard
from the other nodes by then.
"""

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import grpc

from node_agent import openssl
from node_agent.controlplane_access import (
    CONNECT_TIMEOUT_SECONDS,
    PERMANENT_REFUSALS,
    RECONNECT_BACKOFF,
    REFUSALS_TO_BACK_OFF,
    REFUSED_BACKOFF,
    RESUME_SETTLE_SECONDS,
    RPC_TIMEOUT_SECONDS,
    ConfigHandler,
    ControlPlaneEndpoint,
    IssuedCertificate,
    StaticToken,
    Status,
    TokenSource,
    XdsSubscription,
)
from weir_common import xds_transport
from weir_common._generated.weir.v1 import (
    ca_pb2,
    ca_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from weir_common.errors import TransientError
from weir_common.mesh import RESOURCE_TYPES, auth_metadata, resource_name
from weir_common.retry import Backoff

log = logging.getLogger(__name__)


def status_of(error: grpc.aio.AioRpcError) -> Status:
    """A grpcio call's failure as a controlplane_access.Status."""
    return Status(error.code().value[0])


async def request_certificate(
    channel: grpc.aio.Channel, token: str | TokenSource, spiffe_id: str, validity_seconds: int = 0
) -> IssuedCertificate:
    """Generate a P-256 key here and get it certified for `spiffe_id`.

    `channel` should come from ControlPlaneEndpoint.open_channel, so the CA is
    verified before the token is sent.
    """
    key_pem, csr_pem = openssl.new_key_and_csr(spiffe_id)
    metadata = auth_metadata(token if isinstance(token, str) else token.token())
    stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
    response = await stub.SignCertificate(
        ca_pb2.SignCertificateRequest(
            csr_pem=csr_pem,
            spiffe_id=spiffe_id,
            validity_seconds=validity_seconds,
        ),
        metadata=metadata,
        timeout=RPC_TIMEOUT_SECONDS,
    )
    return IssuedCertificate(
        private_key_pem=key_pem,
        chain_pem=tuple(response.certificate_chain_pem),
        trust_bundle_pem=tuple(response.trust_bundle_pem),
    )


@dataclass(frozen=True)
class WorkloadRegistration:
    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]


class ControlPlaneClient:
    """One node agent's connection to the control plane; use `async with`."""

    def __init__(
        self,
        endpoint: ControlPlaneEndpoint,
        node: str,
        token: str | TokenSource,
        *,
        backoff: Backoff = RECONNECT_BACKOFF,
        refused_backoff: Backoff = REFUSED_BACKOFF,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        resume_settle: float = RESUME_SETTLE_SECONDS,
    ) -> None:
        self.endpoint = endpoint
        self.node = node
        self._token: TokenSource = StaticToken(token) if isinstance(token, str) else token
        self.backoff = backoff
        self.refused_backoff = refused_backoff
        self.resume_settle = resume_settle
        self.connect_timeout = connect_timeout
        self.channel = endpoint.open_channel(backoff, connect_timeout)
        # "<namespace>/<name>" -> what this node registered and has not removed.
        self._registered: dict[str, WorkloadRegistration] = {}
        # Keys of _registered the control plane has not confirmed since they were
        # registered (or since the last stream began), and a wake-up for catch_up.
        self._unsent: set[str] = set()
        self._unsent_waiting = asyncio.Event()
        # uid -> a removal the control plane has not confirmed. Until it does,
        # the pod's IPs stay taken there and would refuse a new pod reusing them.
        self._unconfirmed_removals: dict[str, WorkloadRegistration] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.channel.close(None)

    async def wait_until_reachable(self) -> None:
        """Until the channel is connected; TransientError if not within the connect timeout
        (the subscription then retries on its backoff, the config held staying in force)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.connect_timeout)
        except TimeoutError:
            raise TransientError(
                f"control plane at {self.endpoint.target} not reachable within "
                f"{self.connect_timeout:.0f} s"
            ) from None

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        """The call's credentials; raises TransientError while the token cannot be read."""
        return auth_metadata(self._token.token())

    @property
    def registrations(self) -> Mapping[str, WorkloadRegistration]:
        return self._registered

    @property
    def unsent(self) -> frozenset[str]:
        """Registrations ("<namespace>/<name>") waiting for the control plane to be reachable."""
        return frozenset(self._unsent)

    def retry_delay(self, failures: int, code: Status | None) -> float:
        """How long to wait after `failures` failures in a row, the last ending with `code`.

        None is a failure without an answer from the control plane.
        """
        backoff = self.refused_backoff if code in REFUSALS_TO_BACK_OFF else self.backoff
        return backoff.delay(failures)

    async def wait_to_retry(self, failures: int, code: Status | None) -> None:
        """Wait retry_delay; while the channel is down, only until it is up again.

        gRPC reconnects the channel on its own backoff; sleeping ours after it
        would add the two. A channel that is up and still failed (the server
        answered) gets the full delay, so nothing retries in a tight loop.
        """
        delay = self.retry_delay(failures, code)
        if code in REFUSALS_TO_BACK_OFF or (
            self.channel.get_state() == grpc.ChannelConnectivity.READY
        ):
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.channel.channel_ready(), delay)

    def subscribe(
        self, handler: ConfigHandler, *, types: Sequence[str] = RESOURCE_TYPES
    ) -> "XdsClient":
        """The config subscription of this node; `await .run()` to keep it going."""
        return XdsClient(self, handler, types=types)

    async def request_certificate(
        self, spiffe_id: str, validity_seconds: int = 0
    ) -> IssuedCertificate:
        return await request_certificate(self.channel, self._token, spiffe_id, validity_seconds)

    def remember(self, registrations: Iterable[WorkloadRegistration]) -> None:
        """Take over what an earlier agent process registered, without sending it now.

        The next xDS stream sends them (restore_registrations), so a control
        plane that restarts after the agent did still gets every pod back.
        """
        for registration in registrations:
            key = resource_name(registration.namespace, registration.name)
            self._registered[key] = registration
            self._unsent.add(key)

    async def register_workload(
        self, *, namespace: str, name: str, uid: str, ips: Iterable[str]
    ) -> None:
        """Report an enrolled pod; it is reported again on every new xDS stream.

        A refusal (grpc.aio.AioRpcError) that registering again cannot fix
        forgets the pod. Any other failure (the same error, or TransientError
        without a token) keeps it as unsent: catch_up sends it while a stream
        is up, and every new stream sends it first.
        """
        registration = WorkloadRegistration(namespace, name, uid, tuple(ips))
        key = resource_name(namespace, name)
        # Kept before anything is sent, so that it is not lost if nothing can be.
        self._registered[key] = registration
        self._unsent.add(key)
        try:
            # A pod that left may still hold these IPs at the control plane.
            await self._confirm_removals()
            await self._send_registration(registration)
        except grpc.aio.AioRpcError as exc:
            if status_of(exc) in PERMANENT_REFUSALS:
                self._forget(key, registration)
            else:
                self._unsent_waiting.set()
            raise
        except TransientError:
            self._unsent_waiting.set()
            raise
        self._sent(key, registration)

    def _sent(self, key: str, registration: WorkloadRegistration) -> None:
        if self._registered.get(key) is registration:
            self._unsent.discard(key)

    def _forget(self, key: str, registration: WorkloadRegistration) -> None:
        if self._registered.get(key) is registration:
            del self._registered[key]
            self._unsent.discard(key)

    async def deregister_workload(self, *, namespace: str, name: str, uid: str) -> None:
        """Report a pod gone; if the control plane cannot be told now, it is told later.

        An unconfirmed removal is sent again before the next registration and
        at the start of every xDS stream, until the control plane confirms it.
        """
        key = resource_name(namespace, name)
        registered = self._registered.get(key)
        if registered is not None and registered.uid == uid:
            self._forget(key, registered)
        removal = WorkloadRegistration(namespace, name, uid, ())
        self._unconfirmed_removals.pop(uid, None)
        try:
            await self._send_removal(removal)
        except grpc.aio.AioRpcError as exc:
            if status_of(exc) not in PERMANENT_REFUSALS:
                self._unconfirmed_removals[uid] = removal
                self._unsent_waiting.set()
            raise
        except TransientError:
            self._unconfirmed_removals[uid] = removal
            self._unsent_waiting.set()
            raise

    @property
    def unconfirmed_removals(self) -> Mapping[str, WorkloadRegistration]:
        return self._unconfirmed_removals

    async def _confirm_removals(self) -> None:
        """Send the removals that failed before; raises while the control plane is unreachable."""
        for uid, removal in list(self._unconfirmed_removals.items()):
            try:
                await self._send_removal(removal)
            except grpc.aio.AioRpcError as exc:
                if status_of(exc) not in PERMANENT_REFUSALS:
                    raise
                # NOT_FOUND and the like: the control plane holds nothing of it any more.
            self._unconfirmed_removals.pop(uid, None)

    async def _send_removal(self, removal: WorkloadRegistration) -> None:
        await registry_pb2_grpc.WorkloadRegistryStub(self.channel).DeregisterWorkload(
            registry_pb2.DeregisterWorkloadRequest(
                namespace=removal.namespace, name=removal.name, uid=removal.uid
            ),
            metadata=self.metadata,
            timeout=RPC_TIMEOUT_SECONDS,
        )

    async def restore_registrations(self) -> None:
        """Send every remembered registration again (the control plane may have restarted).

        Raises grpc.aio.AioRpcError when the control plane cannot be reached,
        so the caller retries later; a permanent refusal drops that one pod.
        """
        await self._confirm_removals()
        await self._send_each(list(self._registered.items()))

    async def catch_up(self) -> None:
        """Send unsent registrations and unconfirmed removals as soon as they can go.

        Runs beside a config stream that is up (XdsClient does so), until
        cancelled: a registration refused for a moment (the control plane
        was overloaded, a call timed out) must not wait for the next stream.
        """
        failures = 0
        while True:
            await self._unsent_waiting.wait()
            try:
                await self._confirm_removals()
                await self._send_each(
                    [
                        (key, self._registered[key])
                        for key in self._unsent
                        if key in self._registered
                    ]
                )
            except grpc.aio.AioRpcError as exc:
                failures += 1
                await self.wait_to_retry(failures, status_of(exc))
                continue
            except TransientError:
                failures += 1
                await self.wait_to_retry(failures, None)
                continue
            failures = 0
            if not self._unsent and not self._unconfirmed_removals:
                self._unsent_waiting.clear()

    async def _send_each(self, registrations: Sequence[tuple[str, WorkloadRegistration]]) -> None:
        """Send `registrations` in turn; raises at the first the control plane did not take
        for now, dropping (and logging) those it refused for good."""
        for key, registration in registrations:
            try:
                await self._send_registration(registration)
            except grpc.aio.AioRpcError as exc:
                if status_of(exc) not in PERMANENT_REFUSALS:
                    self._unsent_waiting.set()
                    raise
                self._forget(key, registration)
                log.warning(
                    "control plane refused the registration of %s for good, forgetting it: %s %s",
                    key,
                    exc.code().name,
                    exc.details(),
                )
            else:
                self._sent(key, registration)

    async def _send_registration(self, registration: WorkloadRegistration) -> None:
        await registry_pb2_grpc.WorkloadRegistryStub(self.channel).RegisterWorkload(
            registry_pb2.RegisterWorkloadRequest(
                namespace=registration.namespace,
                name=registration.name,
                uid=registration.uid,
                ips=registration.ips,
            ),
            metadata=self.metadata,
            timeout=RPC_TIMEOUT_SECONDS,
        )


class XdsClient(XdsSubscription):
    """The node agent's config subscription, over a grpcio stream."""

    def __init__(
        self,
        client: ControlPlaneClient,
        handler: ConfigHandler,
        *,
        types: Sequence[str] = RESOURCE_TYPES,
    ) -> None:
        super().__init__(
            node=client.node, target=client.endpoint.target, handler=handler, types=types
        )
        self._client = client

    def _call_failure(self, exc: Exception) -> tuple[Status, str] | None:
        if not isinstance(exc, grpc.aio.AioRpcError):
            return None
        return status_of(exc), f"{exc.code().name}: {exc.details()}"

    async def _wait_to_retry(self, failures: int, code: Status | None) -> None:
        await self._client.wait_to_retry(failures, code)

    async def _session(self) -> None:
        # Before subscribing, so the first push already carries this node's pods.
        await self._client.restore_registrations()
        catch_up = asyncio.create_task(self._client.catch_up(), name="registration catch-up")
        try:
            if self.holds_config:
                # Reachable again, then the other nodes get time to register (as the
                # proxy's client does). Not decided on the channel's state at this
                # instant: a node with no pods sends nothing before this, so its
                # channel could still be connecting, and it skipped the settle and
                # took config from a restarted control plane that had not yet heard
                # from the other nodes.
                await self._client.wait_until_reachable()
                await self._settle(self._client.resume_settle)
            await self._stream()
        finally:
            catch_up.cancel()
            # Not `await catch_up`: that would take a cancellation of this task for its own.
            await asyncio.wait({catch_up})
            if not catch_up.cancelled() and catch_up.exception() is not None:
                log.error(
                    "sending unsent registrations failed: %r; the next stream sends them",
                    catch_up.exception(),
                )

    async def _stream(self) -> None:
        call = self._client.channel.stream_stream(
            xds_transport.DELTA_METHOD,
            request_serializer=xds_transport.passthrough,
            response_deserializer=xds_transport.decode_response,
        )(None, metadata=self._client.metadata)
        try:
            for request in self._subscriptions():
                await call.write(request)
            self.connected.set()
            async for response in call:
                await call.write(self._apply(response))
        finally:
            call.cancel()
