"""Inbound: HBONE on 15008 (mTLS, CONNECT streams) and plaintext on 15006.

Both end the same way: authorize, then connect to the target port from
inside the destination pod's netns, with the proxy mark so capture lets the
connection through. A CONNECT may only name an address of the pod whose
15008 it arrived on: one pod's tunnel port is never a way into another.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import ssl
from typing import Final

from node_agent.constants import (
    INBOUND_PLAINTEXT_CAPTURE_PORT,
    INBOUND_TUNNEL_PORT,
    OUTBOUND_CAPTURE_PORT,
)
from node_agent.proxy import tls_transport
from node_agent.proxy.authz import Request, authorize
from node_agent.proxy.connections import (
    ConnectionTasks,
    Refusals,
    UpstreamConnector,
    UpstreamError,
    carry,
    format_authority,
)
from node_agent.proxy.hbone import H2Protocol, HboneStream, Headers, Relay, TcpPeer
from node_agent.proxy.http2.keepalive import KeepaliveSettings
from node_agent.proxy.model import MtlsMode, parse_ip
from node_agent.proxy.original_dst import original_destination_of
from node_agent.proxy.state import MeshView, PodState, TlsContexts
from node_agent.proxy.telemetry import ConnectionRecord, Telemetry
from node_agent.proxy.tls import ALPN_H2, peer_identity

log = logging.getLogger(__name__)

TUNNEL: Final = "tunnel"
ACCEPT_ERROR_PAUSE_SECONDS: Final = 0.1
PLAINTEXT: Final = "plaintext"
_AUTHORITY: Final = re.compile(
    r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})$"
)
# Never a CONNECT target: forwarding there would loop back into a proxy listener.
_PROXY_PORTS: Final = frozenset(
    {OUTBOUND_CAPTURE_PORT, INBOUND_PLAINTEXT_CAPTURE_PORT, INBOUND_TUNNEL_PORT}
)


def parse_authority(value: bytes | None) -> tuple[str, int] | None:
    """(ip, port) from `ip:port` or `[ipv6]:port`; None for anything else (names included)."""
    return None if value is None else _parse_authority(value)


# Cached: a client's streams name the same few targets, and the match took
# a visible share of an inbound connection. Bounded: peers choose the text.
@functools.lru_cache(maxsize=4096)
def _parse_authority(value: bytes) -> tuple[str, int] | None:
    # fullmatch: with match, "$" also takes "ip:port\n".
    match = _AUTHORITY.fullmatch(value.decode("ascii", "replace"))
    if match is None:
        return None
    port = int(match["port"])
    parsed = parse_ip(match["v6"] or match["v4"])
    if parsed is None or not 0 < port < 65536 or (match["v6"] is not None) != (parsed[1] == 6):
        return None
    return parsed[0], port


class TunnelListener:
    """Accepts on a pod's 15008 and hands each socket to a TLS handshake task.

    Sockets are accepted by hand, not by create_server: a handshake must own
    the socket from its first byte, and a protocol given a fresh connection
    can already have been handed data.
    """

    def __init__(self, inbound: Inbound, pod: PodState, sock: socket.socket) -> None:
        self._inbound = inbound
        self._pod = pod
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_forever())

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                # Out of file descriptors and the like: the listener stays, this
                # client is lost; pause so a persistent error cannot spin.
                log.warning("accepting on %s:15008 failed: %s", self._pod.workload.key, e)
                await asyncio.sleep(ACCEPT_ERROR_PAUSE_SECONDS)
                continue
            conn.setblocking(False)
            # Frames are small and latency-bound (a CONNECT, a window update).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._inbound.tunnel_accepted(self._pod, conn)

    def close(self) -> None:
        self._task.cancel()
        self._sock.close()


class Inbound:
    """15008 and 15006 of every served pod: check the peer, authorize, connect to the app.

    `tls` has each local identity's server context; `upstream` connects from
    inside the destination pod's netns.
    """

    def __init__(
        self,
        *,
        mesh: MeshView,
        tls: TlsContexts,
        upstream: UpstreamConnector,
        tasks: ConnectionTasks,
        refusals: Refusals,
        telemetry: Telemetry,
        handshake_timeout: float,
        keepalive: KeepaliveSettings | None,
    ) -> None:
        self._mesh = mesh
        self._tls = tls
        self._upstream = upstream
        self._tasks = tasks
        self._refusals = refusals
        self._telemetry = telemetry
        self._handshake_timeout = handshake_timeout
        self._keepalive = keepalive

    # -- 15008 ------------------------------------------------------------

    def tunnel_accepted(self, pod: PodState, sock: socket.socket) -> None:
        self._tasks.spawn(self._handshake(pod, sock))

    async def _handshake(self, pod: PodState, sock: socket.socket) -> None:
        refusals = self._refusals
        try:
            peer = sock.getpeername()
        except OSError:  # gone between accept and now: nothing to refuse or count
            sock.close()
            return
        try:
            tls = await tls_transport.handshake(
                sock,
                self._tls.server(pod.identity).context,
                server_side=True,
                timeout=self._handshake_timeout,
            )
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            sock.close()
            refusals.refuse(TUNNEL, _handshake_failure(e), f"TLS handshake from {peer}: {e}", None)
            return
        identity = peer_identity(tls)
        if tls.selected_alpn_protocol() != ALPN_H2:
            tls.close()
            refusals.refuse(TUNNEL, "no_alpn_h2", f"{peer} did not negotiate ALPN h2", None)
            return
        if identity is None or identity.trust_domain != self._mesh.snapshot.trust_domain:
            tls.close()
            refusals.refuse(TUNNEL, "bad_peer_identity", f"{peer} presented no mesh identity", None)
            return
        conn = H2Protocol(
            client_side=False,
            on_request=lambda stream, headers: self._request(pod, conn, stream, headers),
            on_closed=lambda c, reason: self._tunnel_closed(pod, c, reason),
            keepalive=self._keepalive,
        )
        conn.peer_identity = identity
        pod.tunnels.add(conn)
        tls_transport.TlsTransport(tls, conn, lend_reads=True)

    def _tunnel_closed(self, pod: PodState, conn: H2Protocol, reason: str | None) -> None:
        pod.tunnels.discard(conn)
        if conn.protocol_error is not None:
            self._refusals.refuse(TUNNEL, "http2_protocol_error", conn.protocol_error, None)
        if conn.peer_silent:
            self._refusals.silent_peer(
                "inbound", f"from {conn.peer_identity} to pod {pod.workload.key}: {reason}"
            )

    def _request(
        self, pod: PodState, conn: H2Protocol, stream: HboneStream, headers: Headers
    ) -> None:
        self._tasks.spawn(self._serve_stream(pod, conn, stream, headers))

    async def _serve_stream(
        self, pod: PodState, conn: H2Protocol, stream: HboneStream, headers: Headers
    ) -> None:
        refusals = self._refusals
        assert conn.transport is not None
        peer = conn.transport.get_extra_info("peername")
        source_ip = str(peer[0]) if peer else ""
        if headers.get(b":method") != b"CONNECT":
            conn.respond(stream, 405)
            refusals.refuse(
                TUNNEL, "not_connect", f"{source_ip}: {headers.get(b':method')!r}", None
            )
            return
        target = parse_authority(headers.get(b":authority"))
        if target is None:
            conn.respond(stream, 400)
            refusals.refuse(
                TUNNEL, "malformed_authority", f"{source_ip}: {headers.get(b':authority')!r}", None
            )
            return
        address, port = target
        snapshot = self._mesh.snapshot
        workload = snapshot.workloads.get(pod.workload.key, pod.workload)
        if address not in pod.addresses or port in _PROXY_PORTS:
            conn.respond(stream, 400)
            refusals.refuse(
                TUNNEL,
                "non_local_authority",
                f"{source_ip} asked {pod.workload.key} for {address}:{port}",
                None,
            )
            return
        source_workload = snapshot.workload_by_ip(source_ip)
        identity = conn.peer_identity
        if (
            source_workload is not None
            and source_workload.identity(snapshot.trust_domain) != identity
        ):
            source_workload = None  # the address is not who the certificate says: trust the cert
        record = ConnectionRecord(
            reporter="destination",
            source_addr=source_ip,
            destination_addr=format_authority(address, port),
            source_workload=source_workload,
            source_identity=identity,
            destination_workload=workload,
            destination_identity=pod.identity,
            mtls=True,
        )
        decision = authorize(snapshot, Request(identity, source_ip, workload, port))
        if not decision.allowed:
            conn.respond(stream, 403)
            self._telemetry.failed(record, "denied", decision.reason)
            refusals.denied(identity, record.destination_addr, decision.reason)
            return
        try:
            _, upstream = await self._upstream.connect(pod, address, port, TcpPeer)
        except UpstreamError as e:
            conn.respond(stream, 503)
            self._telemetry.failed(record, "upstream_unreachable", str(e))
            return
        if stream.flow.done.done():  # the client gave up while we connected
            upstream.abort()
            self._telemetry.failed(
                record, "client_gone", "stream ended before the upstream answered"
            )
            return
        conn.respond(stream, 200)
        stream.attach(upstream)
        await carry(self._telemetry, record, stream.flow, (upstream,), stream=stream)

    # -- 15006 ------------------------------------------------------------

    def plaintext_accepted(
        self, pod: PodState, family: socket.AddressFamily, peer: TcpPeer
    ) -> None:
        """`peer` connected to `pod`'s plaintext inbound listener of `family`."""
        self._tasks.spawn(self._plaintext(pod, family, peer))

    async def _plaintext(self, pod: PodState, family: socket.AddressFamily, peer: TcpPeer) -> None:
        refusals = self._refusals
        assert peer.transport is not None
        client = peer.transport.get_extra_info("peername")
        source_ip = str(client[0]) if client else ""
        try:
            address, port = original_destination_of(peer.socket_fd(), family)
        except OSError as e:
            refusals.refuse(PLAINTEXT, "no_original_destination", f"from {client}: {e}", peer)
            return
        if port in _PROXY_PORTS:
            refusals.refuse(PLAINTEXT, "loop", f"{client} dialed {address}:{port} directly", peer)
            return
        snapshot = self._mesh.snapshot
        workload = snapshot.workloads.get(pod.workload.key, pod.workload)
        record = ConnectionRecord(
            reporter="destination",
            source_addr=source_ip,
            destination_addr=format_authority(address, port),
            source_workload=snapshot.workload_by_ip(source_ip),
            destination_workload=workload,
            destination_identity=pod.identity,
        )
        if workload.mtls_mode is MtlsMode.STRICT:
            refusals.count(PLAINTEXT, "strict_mtls")
            self._telemetry.failed(record, "denied", "plaintext refused: mTLS mode is STRICT")
            peer.abort()
            return
        decision = authorize(snapshot, Request(None, source_ip, workload, port))
        if not decision.allowed:
            self._telemetry.failed(record, "denied", decision.reason)
            peer.abort()
            return
        try:
            _, upstream = await self._upstream.connect(pod, address, port, TcpPeer)
        except UpstreamError as unreachable:
            self._telemetry.failed(record, "upstream_unreachable", str(unreachable))
            peer.abort()
            return
        await carry(self._telemetry, record, Relay(peer, upstream).flow, (peer, upstream))


def _handshake_failure(error: BaseException) -> str:
    """A bounded label for why a TLS handshake failed."""
    if isinstance(error, ssl.SSLError):
        return f"tls_{(error.reason or 'error').lower()}"
    if isinstance(error, TimeoutError | ConnectionAbortedError):
        return "tls_handshake_timeout"
    if isinstance(error, ConnectionResetError | BrokenPipeError):
        return "tls_reset"
    return "tls_io_error"
