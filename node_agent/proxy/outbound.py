"""Outbound (15001 in the source pod): original destination -> HBONE tunnel or pass-through.

The source workload is the pod whose netns the listener lives in: a
connection can only arrive on that listener from inside that pod.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Final

from node_agent.constants import INBOUND_TUNNEL_PORT, OUTBOUND_CAPTURE_PORT
from node_agent.proxy.connections import (
    ConnectionTasks,
    Refusals,
    UpstreamConnector,
    UpstreamError,
    carry,
    format_authority,
)
from node_agent.proxy.hbone import (
    H2Protocol,
    HboneStream,
    Headers,
    Relay,
    StreamRefusedError,
    TcpPeer,
)
from node_agent.proxy.http2.keepalive import KeepaliveSettings
from node_agent.proxy.original_dst import original_destination_of
from node_agent.proxy.pool import ConnectionPool
from node_agent.proxy.routing import (
    Endpoint,
    EndpointPicker,
    MeshRoute,
    Passthrough,
    RouteCache,
)
from node_agent.proxy.state import MeshView, PodState, TlsContexts
from node_agent.proxy.telemetry import ConnectionRecord, Telemetry
from node_agent.proxy.tls import ALPN_H2, peer_identity
from weir_common.futures import fail
from weir_common.mesh import SpiffeId

log = logging.getLogger(__name__)

LISTENER: Final = "outbound"
# Endpoints tried for one connection before giving up; each costs up to a connect timeout.
MAX_ATTEMPTS: Final = 3


class ResponseDeadlines:
    """CONNECT streams awaiting their response, each failed with TimeoutError once
    `timeout` seconds have passed, give or take a quarter of that.

    One timer looks at them all a few times per `timeout`, while any wait:
    a timer of its own per stream cost each connection about a microsecond
    to arm and cancel (and a libuv handle to close), for an answer that
    almost always comes within a millisecond.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._tick = min(timeout / 4, 1.0)
        # Insertion order is deadline order: every stream waits the same `timeout`.
        self._waiting: dict[HboneStream, float] = {}
        self._sweeping: asyncio.AbstractEventLoop | None = None  # where the timer is armed

    def watch(self, stream: HboneStream) -> None:
        loop = stream.conn.loop
        self._waiting[stream] = loop.time() + self._timeout
        # Not only "is a timer armed": one armed on a loop since closed never fires.
        if self._sweeping is not loop:
            self._sweeping = loop
            loop.call_later(self._tick, self._sweep, loop)

    def forget(self, stream: HboneStream) -> None:
        self._waiting.pop(stream, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        expired = []
        for stream, deadline in self._waiting.items():
            if deadline > now:
                break
            expired.append(stream)
        for stream in expired:
            del self._waiting[stream]
            fail(stream.response, TimeoutError())
        if self._waiting:
            loop.call_later(self._tick, self._sweep, loop)
        else:
            self._sweeping = None


class _RefusedStreamError(Exception):
    """A stream refused on a connection opened at `connection_opened_at` (monotonic)."""

    def __init__(self, error: StreamRefusedError, connection_opened_at: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.connection_opened_at = connection_opened_at


class RefusedError(Exception):
    """The destination refused on purpose (policy, bad request): trying elsewhere won't help."""


class Outbound:
    """15001 of every served pod: resolve where the app was going, then tunnel or pass through.

    `pool` shares mTLS connections among streams; `picker` orders a service's
    endpoints; `tls` has each source identity's client context.
    """

    def __init__(
        self,
        *,
        mesh: MeshView,
        tls: TlsContexts,
        pool: ConnectionPool,
        picker: EndpointPicker,
        upstream: UpstreamConnector,
        tasks: ConnectionTasks,
        refusals: Refusals,
        telemetry: Telemetry,
        response_timeout: float,
        keepalive: KeepaliveSettings | None,
    ) -> None:
        self._mesh = mesh
        self._tls = tls
        self._pool = pool
        self._picker = picker
        self._upstream = upstream
        self._tasks = tasks
        self._refusals = refusals
        self._telemetry = telemetry
        self._deadlines = ResponseDeadlines(response_timeout)
        self._routes = RouteCache()
        self._keepalive = keepalive

    def accepted(self, pod: PodState, family: socket.AddressFamily, peer: TcpPeer) -> None:
        """`peer` connected to `pod`'s outbound listener of `family`."""
        self._tasks.spawn(self._handle(pod, family, peer))

    async def _handle(self, pod: PodState, family: socket.AddressFamily, peer: TcpPeer) -> None:
        assert peer.transport is not None
        client = peer.transport.get_extra_info("peername")
        try:
            dst_ip, dst_port = original_destination_of(peer.socket_fd(), family)
        except OSError as e:
            self._refusals.refuse(LISTENER, "no_original_destination", f"from {client}: {e}", peer)
            return
        if dst_port == OUTBOUND_CAPTURE_PORT:
            # Dialed the listener itself, not redirected: forwarding would loop forever.
            self._refusals.refuse(
                LISTENER, "loop", f"{client} dialed {dst_ip}:{dst_port} directly", peer
            )
            return
        route = self._routes.resolve(self._mesh.snapshot, dst_ip, dst_port)
        record = ConnectionRecord(
            reporter="source",
            source_addr=f"{client[0]}:{client[1]}" if client else "",
            destination_addr=format_authority(dst_ip, dst_port),
            source_workload=pod.workload,
            source_identity=pod.identity,
        )
        if isinstance(route, Passthrough):
            await self._passthrough(pod, peer, record, route)
            return
        await self._to_mesh(pod, peer, record, route)

    async def _passthrough(
        self, pod: PodState, peer: TcpPeer, record: ConnectionRecord, route: Passthrough
    ) -> None:
        try:
            _, upstream = await self._upstream.connect(pod, route.address, route.port, TcpPeer)
        except UpstreamError as e:
            self._telemetry.failed(record, "upstream_unreachable", str(e))
            peer.abort()
            return
        await carry(self._telemetry, record, Relay(peer, upstream).flow, (peer, upstream))

    async def _to_mesh(
        self, pod: PodState, peer: TcpPeer, record: ConnectionRecord, route: MeshRoute
    ) -> None:
        picker = self._picker
        record.destination_service = route.service
        ordered = picker.order(route.endpoints)
        if not ordered:
            self._telemetry.failed(record, "no_endpoint", "service has no endpoint")
            peer.abort()
            return
        errors: list[str] = []
        for endpoint in ordered[:MAX_ATTEMPTS]:
            record.destination_workload = endpoint.workload
            record.destination_addr = format_authority(endpoint.address, endpoint.port)
            try:
                if endpoint.workload.captured:
                    record.mtls = True
                    record.destination_identity = endpoint.workload.identity(
                        self._mesh.snapshot.trust_domain
                    )
                    stream = await self._open_tunnel(
                        pod, endpoint, record.destination_identity, peer
                    )
                    picker.started(endpoint)
                    try:
                        stream.attach(peer)
                        await carry(self._telemetry, record, stream.flow, (peer,), stream=stream)
                    finally:
                        picker.finished(endpoint)
                    return
                record.mtls = False
                record.destination_identity = None
                _, upstream = await self._upstream.connect(
                    pod, endpoint.address, endpoint.port, TcpPeer
                )
            except UpstreamError as e:
                picker.failed(endpoint)
                errors.append(f"{record.destination_addr}: {e}")
                continue
            except RefusedError as refused:
                self._telemetry.failed(record, "refused", str(refused))
                peer.abort()
                return
            picker.started(endpoint)
            try:
                await carry(self._telemetry, record, Relay(peer, upstream).flow, (peer, upstream))
            finally:
                picker.finished(endpoint)
            return
        self._telemetry.failed(record, "upstream_unreachable", "; ".join(errors))
        peer.abort()

    async def _open_tunnel(
        self, pod: PodState, endpoint: Endpoint, expected: SpiffeId, peer: TcpPeer
    ) -> HboneStream:
        tls = self._tls.client(pod.identity)
        # Proxy retires pooled connections by this key: pod uid first, TLS generation last.
        key = (pod.uid, endpoint.address, str(expected), tls.generation)

        async def dial() -> H2Protocol:
            return await self._dial(pod, endpoint.address, expected, tls.context)

        authority = format_authority(endpoint.address, endpoint.port)
        started = time.monotonic()
        try:
            try:
                stream, headers = await self._request(key, authority, dial, peer)
            except _RefusedStreamError as e:
                if e.connection_opened_at >= started:
                    raise e.error from None
                # A connection pooled before this request was closed or drained by
                # the peer (idle, or its proxy being upgraded) just as we used it:
                # no fault of the endpoint, so once more; the pool no longer offers
                # that connection, so this goes to a fresh one.
                stream, headers = await self._request(key, authority, dial, peer)
        except _RefusedStreamError as e:
            raise UpstreamError(f"no CONNECT response: {e.error}") from e.error
        except StreamRefusedError as refused:
            raise UpstreamError(f"no CONNECT response: {refused}") from refused
        return self._check_response(stream, headers)

    async def _request(
        self,
        key: Hashable,
        authority: str,
        dial: Callable[[], Awaitable[H2Protocol]],
        peer: TcpPeer,
    ) -> tuple[HboneStream, Headers]:
        """Open a CONNECT stream, `peer`'s early bytes right behind it, and wait for
        its response headers."""
        stream = self._pool.open_stream_now(key, authority)
        if stream is None:
            stream = await self._pool.open_stream(key, authority, dial)
        stream.send_ahead(peer.early_data())
        # Not asyncio.timeout: that costs a task lookup and, on Python 3.11,
        # getpid(2) calls on every connection.
        self._deadlines.watch(stream)
        try:
            return stream, await stream.response
        except StreamRefusedError as e:
            stream.reset(f"no CONNECT response: {e}")
            raise _RefusedStreamError(e, stream.conn.opened_at) from e
        except TimeoutError as timeout:
            stream.reset("no CONNECT response in time")
            raise UpstreamError("no CONNECT response in time") from timeout
        finally:
            self._deadlines.forget(stream)

    @staticmethod
    def _check_response(stream: HboneStream, headers: Headers) -> HboneStream:
        status = headers.get(b":status", b"")
        if status == b"200":
            return stream
        text = status.decode(errors="replace")
        stream.reset(f"CONNECT answered {text}")
        if status == b"503":
            raise UpstreamError("destination could not reach the workload (HTTP 503)")
        raise RefusedError(f"destination refused the tunnel (HTTP {text})")

    async def _dial(
        self, pod: PodState, address: str, expected: SpiffeId, context: ssl.SSLContext
    ) -> H2Protocol:
        conn = H2Protocol(
            client_side=True,
            on_idle=self._pool.connection_idle,
            on_closed=lambda c, reason: self._tunnel_closed(c, address, reason),
            keepalive=self._keepalive,
        )
        transport, _ = await self._upstream.connect(
            pod, address, INBOUND_TUNNEL_PORT, lambda: conn, tls=context
        )
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
            conn.close("peer did not negotiate h2")
            raise UpstreamError(f"{address}: peer did not negotiate ALPN h2")
        actual = peer_identity(ssl_object)
        if actual != expected:
            conn.close("wrong peer identity")
            self._refusals.count(LISTENER, "wrong_peer_identity")
            log.warning("%s presented %s, expected %s: refused", address, actual, expected)
            raise UpstreamError(f"{address} presented identity {actual}, expected {expected}")
        return conn

    def _tunnel_closed(self, conn: H2Protocol, address: str, reason: str | None) -> None:
        self._pool.connection_closed(conn)
        if conn.peer_silent:
            self._refusals.silent_peer(LISTENER, f"to {address}: {reason}")
