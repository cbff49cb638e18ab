"""Reaching the control plane, whichever client does it.

Two clients talk to the control plane: the node agent's, on grpcio
(node_agent.controlplane_client), and the node proxy's, on the proxy's own
HTTP/2 codec (node_agent.proxy.controlplane), which keeps grpcio (about 8 MiB
of a proxy's resident memory) out of the proxy. What both need is here, and
loads no grpcio:

- ControlPlaneEndpoint: where the control plane is and how to check it is the
  real one (TLS, verified against the mesh root; plaintext only to reach a
  control plane started with --insecure-listen).
- TokenSource: where the node's bearer token comes from. A fixed string
  (StaticToken), or a file re-read whenever it changes (TokenFile): the
  kubelet rotates projected ServiceAccount tokens in place.
- Status: gRPC's status codes, and which of them are refusals (a control plane
  that is up and says no) rather than a control plane that is away.
- How often to retry and how long to wait (docs/architecture.md,
  "Control-plane outage").
- XdsSubscription: the delta ADS state of one subscription (what was
  accepted, ACK or NACK for each push), whatever carries the stream.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import enum
import errno
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

from google.protobuf.message import DecodeError, Message

from weir_common import xds_transport
from weir_common.errors import InvalidInputError, TransientError
from weir_common.mesh import MESSAGE_TYPES, RESOURCE_TYPES
from weir_common.retry import Backoff

if TYPE_CHECKING:
    import grpc

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
# A control plane heard nothing from for this long is sent an HTTP/2 PING,
# and the connection is given up if no answer comes within the timeout. A
# control plane whose machine or network vanished sends no FIN or RST, and a
# config stream that sends nothing would wait on it forever, holding stale
# config. Above the control plane's minimum ping interval (10 s) so that it
# never counts our PINGs as abuse.
KEEPALIVE_SECONDS: Final = 30.0
KEEPALIVE_TIMEOUT_SECONDS: Final = 10.0
# A config stream that lived this long counts as healthy when it ends.
HEALTHY_STREAM_SECONDS: Final = 10.0
# The control plane's limit (controlplane/xds_server.py MAX_MESSAGE_BYTES), not
# gRPC's 4 MiB default: one push of ~23,000 workloads exceeded that before
# pushes were split, and the resume request lists every version held.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


class Status(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# Refusals that registering again cannot change (the config or another pod
# says no): a remembered registration that meets one is dropped, not retried.
PERMANENT_REFUSALS: Final = frozenset(
    {
        Status.NOT_FOUND,
        Status.PERMISSION_DENIED,
        Status.ALREADY_EXISTS,
        Status.INVALID_ARGUMENT,
        Status.FAILED_PRECONDITION,
    }
)
# Answers of a control plane that is up and says no: retried on REFUSED_BACKOFF.
# Every other code (UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED...) is taken for
# a control plane that is away, and retried on the reconnect backoff.
REFUSALS_TO_BACK_OFF: Final = PERMANENT_REFUSALS | {
    Status.UNAUTHENTICATED,
    Status.RESOURCE_EXHAUSTED,
    Status.UNIMPLEMENTED,
}


def check_pem_roots(pem: str, what: str) -> None:
    """ValueError unless `pem` holds CA certificates, every one loadable as a TLS client
    loads them (the mesh roots a node is given, the trust bundle the control plane sends)."""
    if "-----BEGIN CERTIFICATE-----" not in pem:  # cadata takes "" without a word
        raise ValueError(f"{what}: not a PEM CA certificate (no PEM certificate in it)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError, TypeError) as e:  # TypeError: text that is not ASCII
        raise ValueError(f"{what}: not a PEM CA certificate ({e})") from None


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
            check_pem_roots(pem.decode("ascii"), "mesh roots")
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{roots_file}: cannot load mesh root PEM: {exc}") from exc
        return cls(target, pem, server_name)

    @classmethod
    def insecure(cls, target: str) -> Self:
        return cls(target, None)

    def open_channel(
        self, backoff: Backoff, connect_timeout: float = CONNECT_TIMEOUT_SECONDS
    ) -> grpc.aio.Channel:
        """A grpcio channel (the node agent's client): grpcio is loaded here, not at
        import, so that the node proxy, which has its own client, never loads it."""
        import grpc  # noqa: PLC0415

        # gRPC's own reconnect backoff grows to 120 s: after a long outage the
        # channel would stay down for up to two minutes after the control plane
        # came back. Capped at ours, it is reached about as soon as we retry.
        options: list[tuple[str, str | int]] = [
            ("grpc.initial_reconnect_backoff_ms", int(backoff.initial * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(backoff.maximum * 1000)),
            # Despite its name, gRPC's minimum time one connection attempt may take.
            ("grpc.min_reconnect_backoff_ms", int(connect_timeout * 1000)),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", int(KEEPALIVE_SECONDS * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
            # gRPC stops pinging after two PINGs with no data sent in between
            # by default; a config stream is mostly quiet, so it must go on.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
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


@dataclass(frozen=True)
class IssuedCertificate:
    private_key_pem: bytes = b""  # stays on this node
    chain_pem: tuple[str, ...] = ()  # leaf first
    trust_bundle_pem: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"IssuedCertificate(chain={len(self.chain_pem)} certs)"


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


class XdsSubscription(abc.ABC):
    """One node's delta ADS subscription, whatever carries its stream.

    Keeps the last good config, ACKs what its handler accepts and NACKs what
    it rejects (keeping the old config), and resumes from the versions it
    holds. `run` stays subscribed, reconnecting with backoff: a subclass
    supplies the stream (`_session`), what a failed call says (`_call_failure`)
    and how long to wait before the next attempt (`_wait_to_retry`).
    """

    def __init__(
        self,
        *,
        node: str,
        target: str,
        handler: ConfigHandler,
        types: Sequence[str] = RESOURCE_TYPES,
    ) -> None:
        self._node = node
        self._target = target
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
        return f"no config stream to the control plane at {self._target}: {self._last_failure}"

    def dump(self) -> dict[str, Any]:
        """The subscription as config_dump shows it: stream state, what is held, last NACK."""
        return {
            "target": self._target,
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

    @property
    def holds_config(self) -> bool:
        return any(self._accepted.values())

    async def run(self) -> None:
        """Stay subscribed until cancelled, reconnecting with backoff.

        A stream that is down is retried on the reconnect backoff (at most
        about a second apart, however long the outage), one the control plane
        refused on its refusal backoff. Failures while disconnected are logged
        once per distinct reason, so an outage of an hour is not a line a second.
        """
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            self._delivered = False
            started = loop.time()
            code: Status | None = None
            try:
                await self._session()
            except TransientError as exc:
                # No token to present (the token source logged why): nothing was sent.
                self._last_failure = exc.message
            except Exception as exc:
                failed = self._call_failure(exc)
                if failed is None:
                    raise
                code, failure = failed
                if failure != self._last_failure or self._delivered:
                    log.warning("xDS stream to %s failed: %s", self._target, failure)
                self._last_failure = failure
            else:
                self._last_failure = "closed by the server"
                log.info("xDS stream to %s closed by the server", self._target)
            finally:
                self.connected.clear()
            # A stream that delivered config and lasted was healthy: back off afresh.
            # One that fails right after each delivery must not reconnect in a tight loop.
            healthy = self._delivered and loop.time() - started >= HEALTHY_STREAM_SECONDS
            failures = 0 if healthy else failures + 1
            await self._wait_to_retry(failures, code)

    @abc.abstractmethod
    async def _session(self) -> None:
        """One stream, from subscribing until it ends; raises what ended it."""

    @abc.abstractmethod
    def _call_failure(self, exc: Exception) -> tuple[Status, str] | None:
        """The status and a line for a failed call; None for an exception that is not one."""

    @abc.abstractmethod
    async def _wait_to_retry(self, failures: int, code: Status | None) -> None:
        """Pace the next attempt after `failures` in a row, the last ending with `code`."""

    async def _settle(self, seconds: float) -> None:
        """After a reconnect, wait before taking config again; the config held stays in
        force meanwhile (see RESUME_SETTLE_SECONDS)."""
        self._last_failure = (
            f"reconnected; resuming config in {seconds:.0f} s, "
            "once other nodes have registered their pods again"
        )
        await asyncio.sleep(seconds)

    def _subscriptions(self) -> list[bytes]:
        """The requests that open a stream: one per type, with the versions held."""
        return [
            xds_transport.encode_request(
                node_id=self._node, type_url=type_url, initial_versions=self.versions(type_url)
            )
            for type_url in self._types
        ]

    def _apply(self, response: xds_transport.DeltaResponse) -> bytes:
        """Apply one push all or nothing; the ACK or NACK to send back.

        Nothing is kept here unless the handler took the push; the handler
        keeps nothing of a push it raises on (see ConfigHandler).
        """
        self._delivered = True
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
                error=(Status.INVALID_ARGUMENT, reason),
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
