"""Outbound (15001 in the source pod): original destination -> HBONE tunnel or pass-through.

The source workload is the pod whose netns the listener lives in: a
connection can only arrive on that listener from inside that pod.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Final

from node_agent.constants import INBOUND_TUNNEL_PORT, OUTBOUND_CAPTURE_PORT
from node_agent.proxy.hbone import (
    H2Protocol,
    HboneStream,
    Headers,
    Relay,
    StreamRefusedError,
    TcpPeer,
)
from node_agent.proxy.original_dst import original_destination
from node_agent.proxy.routing import Endpoint, MeshRoute, Passthrough, resolve
from node_agent.proxy.telemetry import ConnectionRecord
from node_agent.proxy.tls import ALPN_H2, peer_identity
from weir_common.mesh import SpiffeId

if TYPE_CHECKING:
    from node_agent.proxy.proxy import PodState, Proxy

log = logging.getLogger(__name__)

LISTENER: Final = "outbound"
# Endpoints tried for one connection before giving up; each costs up to a connect timeout.
MAX_ATTEMPTS: Final = 3


class UpstreamError(Exception):
    """This endpoint did not take the connection; another one may."""


class RefusedError(Exception):
    """The destination refused on purpose (policy, bad request): trying elsewhere won't help."""


def format_authority(address: str, port: int) -> str:
    return (
        f"[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"
    )


class Outbound:
    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy

    def accepted(self, pod: PodState, peer: TcpPeer) -> None:
        self._proxy.spawn(self._handle(pod, peer))

    async def _handle(self, pod: PodState, peer: TcpPeer) -> None:
        proxy = self._proxy
        assert peer.transport is not None
        client = peer.transport.get_extra_info("peername")
        try:
            dst_ip, dst_port = original_destination(peer.transport.get_extra_info("socket"))
        except OSError as e:
            proxy.refuse(LISTENER, "no_original_destination", f"from {client}: {e}", peer)
            return
        if dst_port == OUTBOUND_CAPTURE_PORT:
            # Dialed the listener itself, not redirected: forwarding would loop forever.
            proxy.refuse(LISTENER, "loop", f"{client} dialed {dst_ip}:{dst_port} directly", peer)
            return
        snapshot = proxy.snapshot
        route = resolve(snapshot, dst_ip, dst_port)
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
            upstream = await self._proxy.connect_tcp(pod, route.address, route.port)
        except UpstreamError as e:
            self._proxy.telemetry.failed(record, "upstream_unreachable", str(e))
            peer.abort()
            return
        await self._proxy.carry(record, Relay(peer, upstream).flow, (peer, upstream))

    async def _to_mesh(
        self, pod: PodState, peer: TcpPeer, record: ConnectionRecord, route: MeshRoute
    ) -> None:
        proxy = self._proxy
        record.destination_service = route.service
        ordered = proxy.picker.order(route.endpoints)
        if not ordered:
            proxy.telemetry.failed(record, "no_endpoint", "service has no endpoint")
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
                        proxy.snapshot.trust_domain
                    )
                    stream = await self._open_tunnel(pod, endpoint, record.destination_identity)
                    proxy.picker.started(endpoint)
                    try:
                        stream.attach(peer)
                        await proxy.carry(record, stream.flow, (peer,), stream=stream)
                    finally:
                        proxy.picker.finished(endpoint)
                    return
                record.mtls = False
                record.destination_identity = None
                upstream = await proxy.connect_tcp(pod, endpoint.address, endpoint.port)
            except UpstreamError as e:
                proxy.picker.failed(endpoint)
                errors.append(f"{record.destination_addr}: {e}")
                continue
            except RefusedError as e:
                proxy.telemetry.failed(record, "refused", str(e))
                peer.abort()
                return
            proxy.picker.started(endpoint)
            try:
                await proxy.carry(record, Relay(peer, upstream).flow, (peer, upstream))
            finally:
                proxy.picker.finished(endpoint)
            return
        proxy.telemetry.failed(record, "upstream_unreachable", "; ".join(errors))
        peer.abort()

    async def _open_tunnel(
        self, pod: PodState, endpoint: Endpoint, expected: SpiffeId
    ) -> HboneStream:
        proxy = self._proxy
        tls = proxy.client_tls(pod.identity)
        key = (pod.uid, endpoint.address, str(expected), tls.generation)

        async def dial() -> H2Protocol:
            return await self._dial(pod, endpoint.address, expected, tls.context)

        authority = format_authority(endpoint.address, endpoint.port)
        dials = proxy.pool.dials
        try:
            try:
                stream, headers = await self._request(key, authority, dial)
            except StreamRefusedError:
                if proxy.pool.dials != dials:
                    raise
                # The pooled connection was closed by the peer (idle, draining) just as
                # we used it: no fault of the endpoint, so once more on a fresh one.
                stream, headers = await self._request(key, authority, dial)
        except StreamRefusedError as e:
            raise UpstreamError(f"no CONNECT response: {e}") from e
        return self._check_response(stream, headers)

    async def _request(
        self, key: Hashable, authority: str, dial: Callable[[], Awaitable[H2Protocol]]
    ) -> tuple[HboneStream, Headers]:
        """Open a CONNECT stream and wait for its response headers."""
        proxy = self._proxy
        stream = await proxy.pool.open_stream(key, authority, dial)
        try:
            async with asyncio.timeout(proxy.settings.connect_timeout):
                return stream, await stream.response
        except StreamRefusedError as e:
            stream.reset(f"no CONNECT response: {e}")
            raise
        except TimeoutError as e:
            stream.reset("no CONNECT response in time")
            raise UpstreamError("no CONNECT response in time") from e

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
        proxy = self._proxy
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        sock = proxy.sockets.stream(pod.netns, family)
        conn = H2Protocol(
            client_side=True,
            on_idle=proxy.pool.connection_idle,
            on_closed=lambda c, _reason: proxy.pool.connection_closed(c),
        )
        try:
            async with asyncio.timeout(proxy.settings.connect_timeout):
                await loop.sock_connect(sock, (address, INBOUND_TUNNEL_PORT))
            transport, _ = await loop.create_connection(
                lambda: conn,
                sock=sock,
                ssl=context,
                server_hostname="",
                ssl_handshake_timeout=proxy.settings.handshake_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as e:
            sock.close()
            raise UpstreamError(f"cannot reach {address}:{INBOUND_TUNNEL_PORT}: {e}") from e
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
            conn.close("peer did not negotiate h2")
            raise UpstreamError(f"{address}: peer did not negotiate ALPN h2")
        actual = peer_identity(ssl_object)
        if actual != expected:
            conn.close("wrong peer identity")
            proxy.metrics.refused(LISTENER, "wrong_peer_identity")
            log.warning("%s presented %s, expected %s: refused", address, actual, expected)
            raise UpstreamError(f"{address} presented identity {actual}, expected {expected}")
        return conn
