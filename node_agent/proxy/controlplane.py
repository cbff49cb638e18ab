"""The node proxy's client of the control plane: gRPC on the proxy's own HTTP/2 codec.

The proxy makes two kinds of call: the delta ADS subscription (one
bidirectional stream) and SignCertificate (unary). grpcio would cost it about
8 MiB of its resident memory, as much as the rest of its data path, so both
run here on the HTTP/2 codec HBONE already uses, over one connection per
control plane (TLS verified against the mesh root, as the agent's client
does), the way gRPC maps calls onto HTTP/2 (gRPC's PROTOCOL-HTTP2): a POST to
/<service>/<method> with content-type application/grpc and te: trailers, each
message behind a 5-byte prefix, the outcome in the trailers (grpc-status,
grpc-message). Messages are never compressed (no grpc-encoding is offered).

A call that cannot reach the control plane fails with RpcError(UNAVAILABLE);
one the control plane answered carries its status. The connection is dialled
on the first call and again on the first call after it is lost or the control
plane sent GOAWAY (streams it already carries run to their end). Retries are
the caller's: the subscription keeps the agent's pacing (controlplane_access).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Final, Self, cast

from google.protobuf.message import DecodeError

from node_agent import openssl
from node_agent.controlplane_access import (
    CONNECT_TIMEOUT_SECONDS,
    KEEPALIVE_SECONDS,
    KEEPALIVE_TIMEOUT_SECONDS,
    MAX_MESSAGE_BYTES,
    RECONNECT_BACKOFF,
    REFUSALS_TO_BACK_OFF,
    REFUSED_BACKOFF,
    RESUME_SETTLE_SECONDS,
    RPC_TIMEOUT_SECONDS,
    ConfigHandler,
    ControlPlaneEndpoint,
    IssuedCertificate,
    Status,
    TokenSource,
    XdsSubscription,
)
from node_agent.proxy.http2.connection import Connection, HeaderList, ProtocolError
from node_agent.proxy.http2.frames import ErrorCode
from node_agent.proxy.http2.keepalive import Keepalive, KeepaliveSettings
from node_agent.proxy.model import parse_ip
from weir_common import xds_transport
from weir_common._generated.weir.v1 import ca_pb2
from weir_common.errors import InvalidInputError
from weir_common.mesh import AUTHORIZATION_METADATA, BEARER_PREFIX, RESOURCE_TYPES
from weir_common.retry import Backoff

log = logging.getLogger(__name__)

SIGN_METHOD: Final = "/weir.v1.CertificateAuthority/SignCertificate"
CONTROLPLANE_KEEPALIVE: Final = KeepaliveSettings(KEEPALIVE_SECONDS, KEEPALIVE_TIMEOUT_SECONDS)
USER_AGENT: Final = b"weir-proxy"
# Receive windows and frame size we advertise: a push of a large mesh is
# megabytes, taken in big frames; every byte is acknowledged as it arrives.
STREAM_WINDOW: Final = 1024 * 1024
CONNECTION_WINDOW: Final = 4 * 1024 * 1024
MAX_FRAME_SIZE: Final = 1024 * 1024
_PREFIX: Final = struct.Struct(">BI")  # compressed flag, length
# gRPC's mapping of an HTTP status that is not 200 (doc/http-grpc-status-mapping.md).
_HTTP_STATUS: Final[dict[int, Status]] = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}
# And of a stream reset (PROTOCOL-HTTP2.md, "Errors").
_RESET_STATUS: Final[dict[int, Status]] = {
    ErrorCode.REFUSED_STREAM: Status.UNAVAILABLE,
    ErrorCode.CANCEL: Status.CANCELLED,
    ErrorCode.ENHANCE_YOUR_CALM: Status.RESOURCE_EXHAUSTED,
    ErrorCode.INADEQUATE_SECURITY: Status.PERMISSION_DENIED,
}


class RpcError(Exception):
    """A call that failed: the control plane's status, or UNAVAILABLE when it was not reached."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details


def split_target(target: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6 address]:port"; InvalidInputError otherwise."""
    host, sep, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        parsed = parse_ip(host)
        valid_host = parsed is not None and parsed[1] == 6
    else:
        valid_host = bool(host) and ":" not in host
    if not (sep and valid_host and port.isdigit() and 0 < int(port) < 65536):
        raise InvalidInputError(f"control plane address {target!r} is not host:port")
    return host, int(port)


def _timeout_header(seconds: float) -> bytes:
    # At most 8 digits; milliseconds reach 27 hours, more than any call here needs.
    return b"%dm" % max(1, min(int(seconds * 1000), 99_999_999))


class _Call:
    """One gRPC call: a stream of the connection, its messages and its outcome."""

    def __init__(self, connection: _Connection, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._buffer = bytearray()
        self.messages: asyncio.Queue[bytes | RpcError | None] = asyncio.Queue()
        self.sent_end = False  # our side of the stream is closed
        self.finished = False

    # -- from the connection ----------------------------------------------------

    def response(self, headers: HeaderList, end_stream: bool) -> None:
        fields = dict(headers)
        raw_status = fields.get(b":status", b"")
        status = int(raw_status) if raw_status.isdigit() else 0
        if status != 200:
            self.finish(RpcError(_HTTP_STATUS.get(status, Status.UNKNOWN), f"HTTP status {status}"))
            return
        content_type = fields.get(b"content-type", b"")
        if not content_type.startswith(b"application/grpc"):
            self.finish(
                RpcError(Status.UNKNOWN, f"content-type {content_type.decode(errors='replace')!r}")
            )
            return
        if end_stream:  # trailers-only: the outcome is in these headers
            self.trailers(headers)

    def data(self, data: memoryview) -> None:
        if self.finished:
            return
        self._buffer += data
        while len(self._buffer) >= _PREFIX.size:
            compressed, length = _PREFIX.unpack_from(self._buffer)
            if length > MAX_MESSAGE_BYTES:
                self.finish(RpcError(Status.RESOURCE_EXHAUSTED, f"{length}-byte message"))
                return
            if compressed:
                self.finish(RpcError(Status.INTERNAL, "compressed message (none was offered)"))
                return
            end = _PREFIX.size + length
            if len(self._buffer) < end:
                return
            self.messages.put_nowait(bytes(self._buffer[_PREFIX.size : end]))
            del self._buffer[:end]

    def trailers(self, headers: HeaderList) -> None:
        fields = dict(headers)
        raw = fields.get(b"grpc-status")
        try:
            status = Status(int(raw)) if raw is not None else None
        except ValueError:
            status = None
        message = urllib.parse.unquote(fields.get(b"grpc-message", b"").decode(errors="replace"))
        if status is None:
            self.finish(RpcError(Status.UNKNOWN, f"no valid grpc-status in the trailers ({raw!r})"))
        elif status != Status.OK:
            self.finish(RpcError(status, message))
        elif self._buffer:
            self.finish(RpcError(Status.INTERNAL, "the stream ended inside a message"))
        else:
            self.finish(None)

    def end(self) -> None:
        """The server's side ended; without trailers that is a broken call."""
        if not self.finished:
            self.finish(RpcError(Status.INTERNAL, "the stream ended without trailers"))

    def reset(self, code: int) -> None:
        self.finish(RpcError(_RESET_STATUS.get(code, Status.INTERNAL), f"stream reset ({code})"))

    def finish(self, error: RpcError | None) -> None:
        """The outcome, once. A call that failed is reset (CANCEL), so the control plane
        stops working on it; one the server ended well while our side was still open (the
        xDS stream) is reset with NO_ERROR, as gRPC does."""
        if self.finished:
            return
        self.finished = True
        if error is not None:
            self._connection.reset(self, ErrorCode.CANCEL)
        elif not self.sent_end:
            self._connection.reset(self, ErrorCode.NO_ERROR)
        self.messages.put_nowait(error)
        self._connection.forget(self)

    # -- for the caller -----------------------------------------------------------

    async def send(self, message: bytes, *, end: bool = False) -> None:
        await self._connection.send(self, _PREFIX.pack(0, len(message)) + message, end=end)

    async def receive(self) -> bytes | None:
        """The next message; None once the call ended well; raises RpcError if it did not."""
        item = await self.messages.get()
        if isinstance(item, RpcError):
            self.messages.put_nowait(item)  # every later receive says the same
            raise item
        if item is None:
            self.messages.put_nowait(None)
        return item

    def cancel(self) -> None:
        self.finish(RpcError(Status.CANCELLED, "cancelled"))


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection to the control plane, and the calls on it.

    A control plane silent for `keepalive.interval` is sent a PING; without an
    answer in `keepalive.timeout` the connection is aborted and its calls fail
    UNAVAILABLE, so the subscription dials again instead of waiting forever.
    """

    def __init__(self, keepalive: KeepaliveSettings) -> None:
        self.h2 = Connection(
            self,
            client_side=True,
            stream_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
            max_frame_size=MAX_FRAME_SIZE,
            max_concurrent_streams=0,  # the control plane opens no streams
        )
        self.transport: asyncio.Transport | None = None
        self._calls: dict[int, _Call] = {}
        self._window = asyncio.Event()
        self.usable = True  # False once lost or told GOAWAY: no new calls here
        self.lost: str | None = None
        self._keepalive_settings = keepalive
        self._keepalive: Keepalive | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's TLS one does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self._keepalive = Keepalive(
            asyncio.get_running_loop(), self._keepalive_settings, ping=self._ping, dead=self._silent
        )
        self._keepalive.start()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self._keepalive is not None:
            self._keepalive.heard = True
        try:
            self.h2.receive(data)
        except ProtocolError as e:
            self.h2.goaway(e.code)
            self.flush()
            self._lose(f"HTTP/2 protocol error from the control plane: {e}")
            return
        self.flush()

    def eof_received(self) -> bool:
        self._lose("the control plane closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection lost: {exc}" if exc else "connection closed")

    def _ping(self) -> None:
        self.h2.ping()
        self.flush()

    def _silent(self, why: str) -> None:
        # Aborted: a close would wait for unsent bytes to reach a dead peer.
        if self.transport is not None:
            self.transport.abort()
        self._lose(f"control plane silent: {why}")

    def _lose(self, why: str) -> None:
        if self._keepalive is not None:
            self._keepalive.stop()
        self.usable = False
        if self.lost is None:
            self.lost = why
        for call in list(self._calls.values()):
            call.finish(RpcError(Status.UNAVAILABLE, why))
        self._window.set()
        if self.transport is not None:
            self.transport.close()

    # -- HTTP/2 events -----------------------------------------------------------------

    def on_request(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        """Never on a client connection (the codec refuses server-opened streams)."""

    def on_response(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            call.response(headers, end_stream)

    def on_trailers(self, stream_id: int, headers: HeaderList) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            call.trailers(headers)

    def on_data(self, stream_id: int, data: memoryview) -> None:
        self.h2.acknowledge(stream_id, len(data))
        call = self._calls.get(stream_id)
        if call is not None:
            call.data(data)

    def on_end(self, stream_id: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            call.end()

    def on_reset(self, stream_id: int, code: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            call.reset(code)

    def on_window(self, stream_id: int) -> None:  # noqa: ARG002 - any window may unblock a sender
        self._window.set()

    def on_goaway(self, last_stream_id: int, code: int) -> None:  # noqa: ARG002
        # Streams it covers run to their end; the next call dials a new connection.
        self.usable = False

    # -- for calls ---------------------------------------------------------------------

    def open(self, headers: HeaderList) -> _Call:
        if not self.usable:
            raise RpcError(Status.UNAVAILABLE, self.lost or "the control plane sent GOAWAY")
        try:
            stream_id = self.h2.open_stream(headers)
        except ProtocolError as e:
            raise RpcError(Status.UNAVAILABLE, str(e)) from None
        call = _Call(self, stream_id)
        self._calls[stream_id] = call
        self.flush()
        return call

    async def send(self, call: _Call, data: bytes, *, end: bool) -> None:
        view = memoryview(data)
        while True:
            if call.finished:
                return  # its outcome is in its messages
            size = min(
                len(view), self.h2.send_window(call.stream_id), self.h2.remote_max_frame_size
            )
            if size or not view:
                last = size == len(view)
                self.h2.send_data(call.stream_id, view[:size], end_stream=end and last)
                call.sent_end = end and last
                self.flush()
                view = view[size:]
                if last:
                    return
                continue
            self._window.clear()
            await self._window.wait()

    def reset(self, call: _Call, code: int) -> None:
        self.h2.reset_stream(call.stream_id, code)
        self.flush()

    def forget(self, call: _Call) -> None:
        self._calls.pop(call.stream_id, None)

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.h2.goaway()
            self.flush()
            self.transport.close()
        self._lose("closed")


class ProxyControlPlaneClient:
    """One node proxy's calls to the control plane, authenticated as its node."""

    def __init__(
        self,
        endpoint: ControlPlaneEndpoint,
        node: str,
        token: TokenSource,
        *,
        backoff: Backoff = RECONNECT_BACKOFF,
        refused_backoff: Backoff = REFUSED_BACKOFF,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        resume_settle: float = RESUME_SETTLE_SECONDS,
        keepalive: KeepaliveSettings = CONTROLPLANE_KEEPALIVE,
    ) -> None:
        self.endpoint = endpoint
        self.node = node
        self._token = token
        self._host, self._port = split_target(endpoint.target)
        self._authority = (endpoint.server_name or endpoint.target).encode()
        self._tls = self._tls_context(endpoint)
        self.backoff = backoff
        self.refused_backoff = refused_backoff
        self.connect_timeout = connect_timeout
        self.resume_settle = resume_settle
        self.keepalive = keepalive
        self._connection: _Connection | None = None
        self._dialing: asyncio.Future[_Connection] | None = None

    @staticmethod
    def _tls_context(endpoint: ControlPlaneEndpoint) -> ssl.SSLContext | None:
        if endpoint.trust_roots_pem is None:
            log.warning("connecting to the control plane at %s WITHOUT TLS", endpoint.target)
            return None
        context = ssl.create_default_context(cadata=endpoint.trust_roots_pem.decode("ascii"))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        return context

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- the calls -----------------------------------------------------------------

    def subscribe(
        self, handler: ConfigHandler, *, types: Sequence[str] = RESOURCE_TYPES
    ) -> ProxyXdsSubscription:
        """The config subscription of this node; `await .run()` to keep it going."""
        return ProxyXdsSubscription(self, handler, types=types)

    async def request_certificate(
        self, spiffe_id: str, validity_seconds: int = 0
    ) -> IssuedCertificate:
        """Generate a P-256 key here and get it certified for `spiffe_id`; only the CSR
        leaves the node. Raises RpcError."""
        key_pem, csr_pem = openssl.new_key_and_csr(spiffe_id)
        request = ca_pb2.SignCertificateRequest(
            csr_pem=csr_pem, spiffe_id=spiffe_id, validity_seconds=validity_seconds
        )
        answer = await self.unary(SIGN_METHOD, request.SerializeToString(), RPC_TIMEOUT_SECONDS)
        try:
            response = ca_pb2.SignCertificateResponse.FromString(answer)
        except DecodeError as e:
            raise RpcError(Status.INTERNAL, f"undecodable SignCertificate answer: {e}") from None
        return IssuedCertificate(
            private_key_pem=key_pem,
            chain_pem=tuple(response.certificate_chain_pem),
            trust_bundle_pem=tuple(response.trust_bundle_pem),
        )

    async def unary(self, method: str, request: bytes, timeout: float) -> bytes:
        """One request, one answer; RpcError(DEADLINE_EXCEEDED) after `timeout` seconds."""
        call: _Call | None = None
        try:
            async with asyncio.timeout(timeout):
                call = await self.start(method, timeout=timeout)
                await call.send(request, end=True)
                answer = await call.receive()
                if answer is None:
                    raise RpcError(Status.INTERNAL, f"{method} answered no message")
                if await call.receive() is not None:
                    raise RpcError(Status.INTERNAL, f"{method} answered more than one message")
                return answer
        except TimeoutError:
            raise RpcError(
                Status.DEADLINE_EXCEEDED, f"{method}: no answer in {timeout} s"
            ) from None
        finally:
            if call is not None:
                call.cancel()

    async def start(self, method: str, *, timeout: float | None = None) -> _Call:
        """A call to `method`, its request headers sent; the caller sends the messages."""
        token = self._token.token()  # TransientError while there is none: nothing is sent
        connection = await self.connect()
        headers: HeaderList = [
            (b":method", b"POST"),
            (b":scheme", b"http" if self._tls is None else b"https"),
            (b":path", method.encode()),
            (b":authority", self._authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", USER_AGENT),
            (AUTHORIZATION_METADATA.encode(), (BEARER_PREFIX + token).encode()),
        ]
        if timeout is not None:
            headers.append((b"grpc-timeout", _timeout_header(timeout)))
        return connection.open(headers)

    async def connect(self) -> _Connection:
        """The connection calls go on: the open one, or a new one (one dial at a time)."""
        if self._connection is not None and self._connection.usable:
            return self._connection
        if self._dialing is None:
            self._dialing = asyncio.get_running_loop().create_future()
            try:
                self._connection = await self._dial()
            except asyncio.CancelledError:
                self._dialing.cancel()
                raise
            except Exception as e:
                self._dialing.set_exception(e)
                self._dialing.exception()  # seen, whether or not anyone else waited
                raise
            else:
                self._dialing.set_result(self._connection)
            finally:
                self._dialing = None
            return self._connection
        return await asyncio.shield(self._dialing)

    async def _dial(self) -> _Connection:
        loop = asyncio.get_running_loop()
        server_name = self.endpoint.server_name or self._host
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self.keepalive),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=server_name if self._tls is not None else None,
                )
        except TimeoutError:
            raise RpcError(
                Status.UNAVAILABLE,
                f"no connection to {self.endpoint.target} in {self.connect_timeout} s",
            ) from None
        except (OSError, ssl.SSLError) as e:
            raise RpcError(
                Status.UNAVAILABLE, f"cannot connect to {self.endpoint.target}: {e}"
            ) from None
        if self._tls is not None:
            transport = connection.transport
            alpn = (
                transport.get_extra_info("ssl_object").selected_alpn_protocol()
                if transport
                else None
            )
            if alpn != "h2":
                connection.close()
                raise RpcError(
                    Status.UNAVAILABLE, f"the control plane did not agree to HTTP/2 (ALPN {alpn!r})"
                )
        return connection

    async def wait_to_retry(self, failures: int, code: Status | None) -> None:
        """Pace the next attempt: the reconnect backoff (a second at most) unless the
        control plane answered with a refusal."""
        backoff = self.refused_backoff if code in REFUSALS_TO_BACK_OFF else self.backoff
        await asyncio.sleep(backoff.delay(failures))


class ProxyXdsSubscription(XdsSubscription):
    """The proxy's config subscription, on its own HTTP/2."""

    def __init__(
        self, client: ProxyControlPlaneClient, handler: ConfigHandler, *, types: Sequence[str]
    ) -> None:
        super().__init__(
            node=client.node, target=client.endpoint.target, handler=handler, types=types
        )
        self._client = client

    def _call_failure(self, exc: Exception) -> tuple[Status, str] | None:
        return (exc.status, str(exc)) if isinstance(exc, RpcError) else None

    async def _wait_to_retry(self, failures: int, code: Status | None) -> None:
        await self._client.wait_to_retry(failures, code)

    async def _session(self) -> None:
        if self.holds_config:
            await self._client.connect()  # reachable again: then give the others time
            await self._settle(self._client.resume_settle)
        call = await self._client.start(xds_transport.DELTA_METHOD)
        try:
            for request in self._subscriptions():
                await call.send(request)
            self.connected.set()
            async for message in _messages(call):
                try:
                    response = xds_transport.decode_response(message)
                except DecodeError as e:
                    raise RpcError(Status.INTERNAL, f"undecodable xDS response: {e}") from None
                await call.send(self._apply(response))
        finally:
            call.cancel()


async def _messages(call: _Call) -> AsyncIterator[bytes]:
    while (message := await call.receive()) is not None:
        yield message
