"""What a node agent uses to talk to the control plane.

- ControlPlaneEndpoint: where the control plane is and how to check it is the
  real one (TLS, verified against the mesh root; plaintext only to reach a
  control plane started with --insecure-listen).
- TokenSource: where the node's bearer token comes from. A fixed string
  (StaticToken), or a file re-read whenever it changes (TokenFile): the
  kubelet rotates projected ServiceAccount tokens in place.
- ControlPlaneClient: one node's connection. It presents the node's bearer
  token on every call, signs certificates (the key is generated here, only the
  CSR is sent), registers and deregisters enrolled workloads (local mode), and
  opens the config subscription.
- XdsClient: subscribes to the mesh over delta ADS, keeps the last good config,
  ACKs what its handler accepts and NACKs what it rejects (keeping the old
  config), reconnects with backoff and resumes from the versions it holds.

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
import datetime
import errno
import logging
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self

import grpc
from google.protobuf.message import DecodeError, Message

from node_agent import openssl
from weir_common import xds_transport
from weir_common._generated.weir.v1 import (
    ca_pb2,
    ca_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from weir_common.errors import InvalidInputError, TransientError
from weir_common.mesh import (
    MESSAGE_TYPES,
    RESOURCE_TYPES,
    auth_metadata,
    resource_name,
)
from weir_common.retry import Backoff

log = logging.getLogger(__name__)

RPC_TIMEOUT_SECONDS: Final = 10.0
# While the control plane is unreachable: the ceiling is the reconnect bound.
RECONNECT_BACKOFF: Final = Backoff(initial=0.1, maximum=1.0)
# After the control plane answered with a refusal (REFUSALS_TO_BACK_OFF).
REFUSED_BACKOFF: Final = Backoff(initial=1.0, maximum=30.0)
# How long one connection attempt (TCP and TLS handshake) may take. gRPC's
# default of 20 s would let a lost SYN hold the next attempt back that long.
CONNECT_TIMEOUT_SECONDS: Final = 5.0
# How long a node that holds config waits after reconnecting before it takes
# config again. A control plane that restarted has forgotten every
# registration and gets them back as the nodes reconnect, each within the
# reconnect bound (about 1.2 s) of its return; config taken before that would
# lack other nodes' pods for a moment, and connections to them would fail.
RESUME_SETTLE_SECONDS: Final = 3.0
# A config stream that lived this long counts as healthy when it ends.
HEALTHY_STREAM_SECONDS: Final = 10.0
# Refusals that registering again cannot change (the config or another pod
# says no): a remembered registration that meets one is dropped, not retried.
PERMANENT_REFUSALS: Final = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
# Answers of a control plane that is up and says no: retried on REFUSED_BACKOFF.
# Every other code (UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED...) is taken for
# a control plane that is away, and retried on the reconnect backoff.
REFUSALS_TO_BACK_OFF: Final = PERMANENT_REFUSALS | {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def _check_roots(pem: str) -> None:
    if "-----BEGIN CERTIFICATE-----" not in pem:  # cadata takes "" without a word
        raise ValueError("no PEM certificate in it")
    # Loaded as a TLS client loads them: every certificate in it must parse.
    ssl.create_default_context(cadata=pem)


@dataclass(frozen=True)
class ControlPlaneEndpoint:
    target: str  # "host:port" as gRPC dials it
    # PEM roots the control plane's serving certificate must chain to (the mesh
    # root); None means plaintext, for a control plane run with --insecure-listen.
    trust_roots_pem: bytes | None = None
    # The name checked against the serving certificate when it differs from
    # the host in `target` (e.g. dialing an IP the certificate does not list).
    server_name: str | None = None

    @classmethod
    def tls(cls, target: str, roots_file: Path, server_name: str | None = None) -> Self:
        """Verify the control plane against the PEM roots in `roots_file`."""
        try:
            pem = roots_file.read_bytes()
            _check_roots(pem.decode("ascii"))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise InvalidInputError(f"{roots_file}: cannot load mesh root PEM: {exc}") from exc
        return cls(target, pem, server_name)

    @classmethod
    def insecure(cls, target: str) -> Self:
        return cls(target, None)

    def open_channel(
        self, backoff: Backoff, connect_timeout: float = CONNECT_TIMEOUT_SECONDS
    ) -> grpc.aio.Channel:
        # gRPC's own reconnect backoff grows to 120 s: after a long outage the
        # channel would stay down for up to two minutes after the control plane
        # came back. Capped at ours, it is reached about as soon as we retry.
        options: list[tuple[str, str | int]] = [
            ("grpc.initial_reconnect_backoff_ms", int(backoff.initial * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(backoff.maximum * 1000)),
            # Despite its name, gRPC's minimum time one connection attempt may take.
            ("grpc.min_reconnect_backoff_ms", int(connect_timeout * 1000)),
            # The control plane's limit (xds_server.MAX_MESSAGE_BYTES), not gRPC's
            # 4 MiB default: one push of ~23,000 workloads exceeded that before
            # pushes were split, and the resume request lists every version held.
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ]
        if self.trust_roots_pem is None:
            log.warning("connecting to the control plane at %s WITHOUT TLS", self.target)
            return grpc.aio.insecure_channel(self.target, options=options)
        if self.server_name is not None:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=self.trust_roots_pem)
        return grpc.aio.secure_channel(self.target, credentials, options=options)


class TokenSource(Protocol):
    def token(self) -> str:
        """The token to send now; raises TransientError when there is none to send."""
        ...


@dataclass(frozen=True)
class StaticToken:
    value: str

    def __repr__(self) -> str:
        return "StaticToken(...)"

    def token(self) -> str:
        return self.value


class TokenFile:
    """A token file, read again whenever it changes (stat on every call, read on change).

    An unreadable or empty file is never sent: the call fails with a
    TransientError, logged once per distinct problem, and the caller retries.
    `keep_when_denied` is for a process that read the file as root and then
    dropped privileges (the proxy in local mode): when it may no longer look at
    the file, it keeps the token it read and says so once.
    """

    def __init__(self, path: Path, *, keep_when_denied: bool = False) -> None:
        self.path = path
        self._keep_when_denied = keep_when_denied
        self._value: str | None = None
        # (inode, size, mtime) of the file the held value was read from.
        self._seen: tuple[int, int, int] | None = None
        self._reported: str | None = None

    def __repr__(self) -> str:
        return f"TokenFile({self.path})"

    def token(self) -> str:
        try:
            st = self.path.stat()  # follows the kubelet's ..data symlink swap
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._value is not None and identity == self._seen:
                return self._value
            text = self.path.read_text().strip()
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM) and self._keep_when_denied and self._value:
                self._report(
                    f"token file {self.path} is not readable any more ({e.strerror}); "
                    "keeping the token read at start",
                    logging.WARNING,
                )
                return self._value
            raise self._problem(f"cannot read token file {self.path}: {e.strerror}") from None
        if not text:
            raise self._problem(f"token file {self.path} is empty")
        if self._value is not None and text != self._value:
            log.info("token file %s changed; using the new token", self.path)
        self._value, self._seen, self._reported = text, identity, None
        return text

    def _problem(self, message: str) -> TransientError:
        self._report(message, logging.ERROR)
        return TransientError(message)

    def _report(self, message: str, level: int) -> None:
        if message != self._reported:
            log.log(level, "%s", message)
            self._reported = message


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
class IssuedCertificate:
    private_key_pem: bytes = b""  # stays on this node
    chain_pem: tuple[str, ...] = ()  # leaf first
    trust_bundle_pem: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"IssuedCertificate(chain={len(self.chain_pem)} certs)"


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

    def retry_delay(self, failures: int, code: grpc.StatusCode | None) -> float:
        """How long to wait after `failures` failures in a row, the last ending with `code`.

        None is a failure without an answer from the control plane.
        """
        backoff = self.refused_backoff if code in REFUSALS_TO_BACK_OFF else self.backoff
        return backoff.delay(failures)

    async def wait_to_retry(self, failures: int, code: grpc.StatusCode | None) -> None:
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
            if exc.code() in PERMANENT_REFUSALS:
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
            if exc.code() not in PERMANENT_REFUSALS:
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
                if exc.code() not in PERMANENT_REFUSALS:
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
                await self.wait_to_retry(failures, exc.code())
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
                if exc.code() not in PERMANENT_REFUSALS:
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


class XdsClient:
    def __init__(
        self,
        client: ControlPlaneClient,
        handler: ConfigHandler,
        *,
        types: Sequence[str] = RESOURCE_TYPES,
    ) -> None:
        self._client = client
        self._node = client.node
        self._handler = handler
        self._types = tuple(types)
        # type URL -> name -> (version, message): the last config the handler accepted.
        self._accepted: dict[str, dict[str, tuple[str, Message]]] = {t: {} for t in self._types}
        self.connected = asyncio.Event()
        self._delivered = False
        self._last_failure = "not connected yet"
        # The last push refused (type, nonce, why, when): what `weir node status` shows.
        self.last_nack: dict[str, str] | None = None
        # Resource type (short name) -> NACKs sent since start: the agent's metrics.
        self.nacks_sent: dict[str, int] = {}

    def not_connected(self) -> str | None:
        """A readiness check: None while the stream is up, else why it is not."""
        if self.connected.is_set():
            return None
        target = self._client.endpoint.target
        return f"no config stream to the control plane at {target}: {self._last_failure}"

    def dump(self) -> dict[str, Any]:
        """The subscription as config_dump shows it: stream state, what is held, last NACK."""
        return {
            "target": self._client.endpoint.target,
            "connected": self.connected.is_set(),
            "not_connected": self.not_connected(),
            "resources": {
                type_url.rsplit(".", 1)[-1]: len(held) for type_url, held in self._accepted.items()
            },
            "last_nack": self.last_nack,
        }

    def versions(self, type_url: str) -> dict[str, str]:
        return {name: version for name, (version, _) in self._accepted[type_url].items()}

    def resources(self, type_url: str) -> dict[str, Message]:
        return {name: message for name, (_, message) in self._accepted[type_url].items()}

    async def run(self) -> None:
        """Stay subscribed until cancelled, reconnecting with backoff.

        A stream that is down is retried on the client's reconnect backoff
        (at most about a second apart, however long the outage), one the
        control plane refused on its refusal backoff. Failures while
        disconnected are logged once per distinct reason, so an outage of an
        hour is not a line a second.
        """
        failures = 0
        target = self._client.endpoint.target
        loop = asyncio.get_running_loop()
        while True:
            self._delivered = False
            started = loop.time()
            code: grpc.StatusCode | None = None
            try:
                await self._session()
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                failure = f"{code.name}: {exc.details()}"
                if failure != self._last_failure or self._delivered:
                    log.warning("xDS stream to %s failed: %s", target, failure)
                self._last_failure = failure
            except TransientError as exc:
                # No token to present (the token source logged why): nothing was sent.
                self._last_failure = exc.message
            else:
                self._last_failure = "closed by the server"
                log.info("xDS stream to %s closed by the server", target)
            finally:
                self.connected.clear()
            # A stream that delivered config and lasted was healthy: back off afresh.
            # One that fails right after each delivery must not reconnect in a tight loop.
            healthy = self._delivered and loop.time() - started >= HEALTHY_STREAM_SECONDS
            failures = 0 if healthy else failures + 1
            await self._client.wait_to_retry(failures, code)

    async def _session(self) -> None:
        # Before subscribing, so the first push already carries this node's pods.
        await self._client.restore_registrations()
        catch_up = asyncio.create_task(self._client.catch_up(), name="registration catch-up")
        try:
            channel = self._client.channel
            if any(self._accepted.values()) and (
                channel.get_state() == grpc.ChannelConnectivity.READY
            ):
                # The config held stays in force meanwhile.
                settle = self._client.resume_settle
                self._last_failure = (
                    f"reconnected; resuming config in {settle:.0f} s, "
                    "once other nodes have registered their pods again"
                )
                await asyncio.sleep(settle)
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
        finally:
            call.cancel()

    def _apply(self, response: xds_transport.DeltaResponse) -> bytes:
        """Apply one push all or nothing; the ACK or NACK to send back.

        Nothing is kept here unless the handler took the push; the handler
        keeps nothing of a push it raises on (see ConfigHandler).
        """
        type_url = response.type_url
        try:
            proposed = self._proposed(response)
            self._handler.apply(
                type_url,
                {name: message for name, (_, message) in proposed.items()},
                [r.name for r in response.resources],
                list(response.removed_resources),
            )
        except Exception as exc:
            if isinstance(exc, InvalidInputError):
                reason = exc.message
            else:
                # A handler that failed did not take the push either. Ending the
                # stream instead would fetch the same push again on reconnect.
                log.exception("%s push %s: the config handler failed", type_url, response.nonce)
                reason = f"config handler failed: {type(exc).__name__}: {exc}"
            log.warning("rejecting %s push %s: %s", type_url, response.nonce, reason)
            kind = type_url.rsplit(".", 1)[-1]
            self.nacks_sent[kind] = self.nacks_sent.get(kind, 0) + 1
            self.last_nack = {
                "type": kind,
                "nonce": response.nonce,
                "reason": reason,
                "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            return xds_transport.encode_request(
                node_id=self._node,
                type_url=type_url,
                response_nonce=response.nonce,
                error=(grpc.StatusCode.INVALID_ARGUMENT.value[0], reason),
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
        message_type = MESSAGE_TYPES.get(type_url)
        if message_type is None:
            raise InvalidInputError(f"no message type known for {type_url}")
        proposed = dict(self._accepted[type_url])
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
