"""HBONE streams over loopback: flow control, half-close, resets, many streams, pooling.

A miniature two-proxy path runs in one event loop: app -> client listener ->
CONNECT stream -> server side -> echo server. HTTP/2 runs over plain TCP
here; TLS is the same transport interface (tested in the netns tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from node_agent.proxy.connections import ConnectionTasks, Refusals, UpstreamConnector, UpstreamError
from node_agent.proxy.hbone import (
    PENDING_HIGH,
    STREAM_WINDOW,
    H2Protocol,
    HboneStream,
    Headers,
    TcpPeer,
)
from node_agent.proxy.http2.keepalive import KeepaliveSettings
from node_agent.proxy.outbound import Outbound
from node_agent.proxy.pool import ConnectionPool, PoolExhaustedError
from node_agent.proxy.routing import EndpointPicker
from node_agent.proxy.sockets import NetnsSocketFactory
from node_agent.proxy.state import MeshView, TlsContexts
from node_agent.proxy.telemetry import AccessLog, ProxyMetrics, Telemetry

LOCAL = "127.0.0.1"


@dataclass
class Path:
    """The pieces of one miniature path, for assertions."""

    pool: ConnectionPool
    app_port: int
    server_streams: list[HboneStream] = field(default_factory=list)
    client_streams: list[HboneStream] = field(default_factory=list)
    server_conns: list[H2Protocol] = field(default_factory=list)
    echo_closed: list[bytes] = field(default_factory=list)  # what each echo connection got
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: Path) -> None:
    got = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            got += chunk
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
    path.echo_closed.append(bytes(got))
    writer.close()


@contextlib.asynccontextmanager
async def mini_path(
    max_streams: int = 100,
    idle: float = 60.0,
    *,
    client_keepalive: KeepaliveSettings | None = None,
    server_keepalive: KeepaliveSettings | None = None,
) -> AsyncIterator[Path]:
    loop = asyncio.get_running_loop()
    pool = ConnectionPool(max_streams=max_streams, idle_seconds=idle)
    path = Path(pool, 0)
    echo = await asyncio.start_server(lambda r, w: _echo(r, w, path), LOCAL, 0)
    echo_port = echo.sockets[0].getsockname()[1]

    def on_request(stream: HboneStream, headers: Headers) -> None:
        async def serve() -> None:
            assert headers[b":method"] == b"CONNECT"
            _, upstream = await loop.create_connection(TcpPeer, LOCAL, echo_port)
            stream.conn.respond(stream, 200)
            stream.attach(upstream)
            path.server_streams.append(stream)

        path.tasks.add(loop.create_task(serve()))

    def server_conn() -> H2Protocol:
        conn = H2Protocol(client_side=False, on_request=on_request, keepalive=server_keepalive)
        path.server_conns.append(conn)
        return conn

    tunnel = await loop.create_server(server_conn, LOCAL, 0)
    tunnel_port = tunnel.sockets[0].getsockname()[1]

    async def dial() -> H2Protocol:
        conn = H2Protocol(
            client_side=True,
            on_idle=pool.connection_idle,
            on_closed=lambda c, _r: pool.connection_closed(c),
            keepalive=client_keepalive,
        )
        await loop.create_connection(lambda: conn, LOCAL, tunnel_port)
        return conn

    def accepted(peer: TcpPeer) -> None:
        async def carry() -> None:
            stream = await pool.open_stream("peer", f"{LOCAL}:{echo_port}", dial)
            path.client_streams.append(stream)
            headers = await stream.response
            assert headers[b":status"] == b"200"
            stream.attach(peer)

        path.tasks.add(loop.create_task(carry()))

    app = await loop.create_server(lambda: TcpPeer(accepted), LOCAL, 0)
    path.app_port = app.sockets[0].getsockname()[1]
    try:
        yield path
    finally:
        pool.close_all()
        for server in (app, tunnel, echo):
            server.close()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOCAL, port)

    async def send() -> None:
        for i in range(0, len(payload), 1 << 20):
            writer.write(payload[i : i + (1 << 20)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await reader.read(-1)
    await sender
    writer.close()
    return received


def test_bulk_transfer_larger_than_every_window(run):
    payload = os.urandom(24 * 1024 * 1024)  # > 16 MiB connection window, > 4 MiB stream window

    async def main():
        async with mini_path() as path:
            assert await roundtrip(path.app_port, payload) == payload
            flow = path.client_streams[0].flow
            assert await flow.done is None
            assert (flow.up, flow.down) == (len(payload), len(payload))
            server_flow = path.server_streams[0].flow
            assert await server_flow.done is None
            assert (server_flow.up, server_flow.down) == (len(payload), len(payload))

    run(main())


def test_half_close_carries_through(run):
    async def main():
        async with mini_path() as path:
            reader, writer = await asyncio.open_connection(LOCAL, path.app_port)
            writer.write(b"question")
            writer.write_eof()  # we are done sending, but still listening
            assert await reader.read(-1) == b"question"
            writer.close()

    run(main())


def test_many_concurrent_streams_share_one_connection(run):
    async def main():
        async with mini_path() as path:
            payloads = [os.urandom(50_000) for _ in range(60)]
            results = await asyncio.gather(*(roundtrip(path.app_port, p) for p in payloads))
            assert results == payloads
            assert path.pool.dials == 1
            assert len(path.server_conns) == 1

    run(main())


def test_stream_limit_opens_another_connection(run):
    async def main():
        async with mini_path(max_streams=2) as path:
            conns = [await asyncio.open_connection(LOCAL, path.app_port) for _ in range(5)]
            for _, writer in conns:
                writer.write(b"x")
            for reader, _ in conns:
                assert await reader.readexactly(1) == b"x"
            assert path.pool.dials == 3
            for _, writer in conns:
                writer.close()

    run(main())


Dialer = Callable[[], Awaitable[H2Protocol]]


@contextlib.asynccontextmanager
async def h2_server_dialer(pool: ConnectionPool) -> AsyncIterator[Dialer]:
    """A local HTTP/2 server and a dial() to it for `pool`; the pool is closed on exit."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: H2Protocol(client_side=False), LOCAL, 0)
    port = server.sockets[0].getsockname()[1]

    async def dial() -> H2Protocol:
        conn = H2Protocol(client_side=True, on_idle=pool.connection_idle)
        await loop.create_connection(lambda: conn, LOCAL, port)
        return conn

    try:
        yield dial
    finally:
        pool.close_all()
        server.close()


def test_a_pooled_connection_with_room_takes_a_stream_without_waiting(run):
    async def main():
        pool = ConnectionPool(max_streams=2)
        async with h2_server_dialer(pool) as dial:
            first = await pool.open_stream("k", "10.0.0.1:80", dial)
            second = pool.open_stream_now("k", "10.0.0.2:80")
            assert second is not None and second.conn is first.conn
            assert len(first.conn.streams) == 2 and pool.dials == 1
            assert pool.open_stream_now("other", "10.0.0.1:80") is None  # keys do not mix

    run(main())


def test_pool_refuses_past_its_bound(run):
    async def main():
        pool = ConnectionPool(max_streams=1, max_connections=1)
        async with h2_server_dialer(pool) as dial:
            assert pool.open_stream_now("k", "10.0.0.1:80") is None  # nothing pooled yet
            await pool.open_stream("k", "10.0.0.1:80", dial)
            assert pool.open_stream_now("k", "10.0.0.1:80") is None  # no room: dial or refuse
            with pytest.raises(PoolExhaustedError):
                await pool.open_stream("k", "10.0.0.1:80", dial)
            assert pool.dials == 1

    run(main())


def test_client_reset_mid_stream_closes_the_upstream(run):
    async def main():
        async with mini_path() as path:
            reader, writer = await asyncio.open_connection(LOCAL, path.app_port)
            writer.write(b"partial")
            assert await reader.readexactly(7) == b"partial"
            # Linger 0: close sends RST, not FIN.
            linger = struct.pack("ii", 1, 0)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            writer.transport.abort()
            server_flow = path.server_streams[0].flow
            error = await asyncio.wait_for(server_flow.done, 5)
            assert error is not None and "reset" in error
            for _ in range(100):
                if path.echo_closed:
                    break
                await asyncio.sleep(0.02)
            assert path.echo_closed == [b"partial"]
            # The connection itself survives for the next stream.
            assert await roundtrip(path.app_port, b"next") == b"next"
            assert path.pool.dials == 1

    run(main())


def test_idle_connection_is_closed(run):
    async def main():
        async with mini_path(idle=0.2) as path:
            assert await roundtrip(path.app_port, b"once") == b"once"
            await asyncio.sleep(0.6)
            assert path.server_conns[0].closed
            assert await roundtrip(path.app_port, b"again") == b"again"
            assert path.pool.dials == 2

    run(main())


def test_a_client_that_stops_reading_is_held_back_not_buffered(run):
    """Backpressure end to end: the echo's replies pile up nowhere in the proxies."""

    async def main():
        async with mini_path() as path:
            reader, writer = await asyncio.open_connection(LOCAL, path.app_port)
            chunk = b"z" * (1 << 20)
            written = 0
            with contextlib.suppress(TimeoutError):
                for _ in range(256):  # far more than every window and buffer together
                    writer.write(chunk)
                    written += len(chunk)
                    await asyncio.wait_for(writer.drain(), 1.0)
            assert written < 128 << 20, "the path never pushed back"
            for stream in path.client_streams + path.server_streams:
                assert len(stream._pending) <= PENDING_HIGH + (1 << 20)
                assert sum(len(d) for d, _ in stream._early) <= STREAM_WINDOW
            # Reading again drains everything that was accepted, intact.
            writer.write_eof()
            received = 0
            while data := await reader.read(1 << 20):
                received += len(data)
            assert received == written
            writer.close()

    run(main())


def test_a_draining_peer_lets_open_streams_finish_and_new_ones_go_to_a_fresh_connection(run):
    """The server drains (GOAWAY) mid-stream: that stream still carries data both
    ways to a clean end, and the next connection through the path is not put on
    the draining one."""

    async def main() -> None:
        async with mini_path() as path:
            reader, writer = await asyncio.open_connection(LOCAL, path.app_port)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            (draining,) = path.server_conns
            draining.shutdown()  # GOAWAY: no new streams, open ones go on
            await asyncio.sleep(0.05)
            client_conn = path.client_streams[0].conn
            assert client_conn.goaway and client_conn.capacity == 0
            writer.write(b"after the GOAWAY")
            assert await reader.readexactly(16) == b"after the GOAWAY"
            assert await roundtrip(path.app_port, b"new connection") == b"new connection"
            assert len(path.server_conns) == 2  # the new stream went to a fresh connection
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            flow = path.client_streams[0].flow
            assert await asyncio.wait_for(flow.done, 5) is None  # a clean end
            await asyncio.sleep(0.05)
            assert draining.closed and client_conn.closed  # closed once its last stream ended

    run(main())


def test_a_connect_left_unanswered_gives_up_at_the_response_timeout_and_resets(run):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        unanswered: list[HboneStream] = []
        server = await loop.create_server(
            lambda: H2Protocol(client_side=False, on_request=lambda s, _h: unanswered.append(s)),
            LOCAL,
            0,
        )
        port = server.sockets[0].getsockname()[1]
        metrics = ProxyMetrics()
        outbound = Outbound(
            mesh=MeshView(),
            tls=TlsContexts(),
            pool=ConnectionPool(max_streams=10, idle_seconds=60),
            picker=EndpointPicker(),
            upstream=UpstreamConnector(
                NetnsSocketFactory(), connect_timeout=1, handshake_timeout=1
            ),
            tasks=ConnectionTasks(),
            refusals=Refusals(metrics),
            telemetry=Telemetry(metrics, AccessLog(lambda _line: None)),
            response_timeout=0.2,
            keepalive=None,
        )

        async def dial() -> H2Protocol:
            conn = H2Protocol(client_side=True)
            await loop.create_connection(lambda: conn, LOCAL, port)
            return conn

        started = loop.time()
        with pytest.raises(UpstreamError, match="no CONNECT response in time"):
            await outbound._request("key", "10.0.0.1:80", dial, TcpPeer())
        assert 0.15 < loop.time() - started < 2.0
        await asyncio.sleep(0.05)
        (stream,) = unanswered
        assert stream.flow.done.done()  # the client reset it: the server let go too
        server.close()

    run(main())


# Short enough for a test: a silent peer is found within 0.5 s of its last byte.
FAST_KEEPALIVE = KeepaliveSettings(interval=0.2, timeout=0.3)


async def echoed_stream(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOCAL, path.app_port)
    writer.write(b"hello")
    assert await reader.readexactly(5) == b"hello"
    return reader, writer


async def wait_until(check, timeout: float) -> float:
    """Seconds until `check()` held; fails the test if it does not within `timeout`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    return loop.time() - start


def test_a_quiet_peer_that_answers_pings_keeps_its_connection(run):
    async def main():
        async with mini_path(client_keepalive=FAST_KEEPALIVE) as path:
            reader, writer = await echoed_stream(path)
            conn = path.client_streams[0].conn
            # Five times interval + timeout with no stream traffic: only PINGs and
            # their answers cross, and they keep the connection.
            await asyncio.sleep(2.5)
            assert not conn.closed and not conn.peer_silent
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            assert path.pool.dials == 1
            writer.close()

    run(main())


def test_a_silent_server_is_given_up_and_the_streams_through_it_reset(run):
    async def main():
        async with mini_path(client_keepalive=FAST_KEEPALIVE) as path:
            reader, writer = await echoed_stream(path)
            conn = path.client_streams[0].conn
            # The server stops reading: it sends nothing more, answers no PING,
            # and its socket stays open (as a peer behind a cut link).
            path.server_conns[0].transport.pause_reading()
            waited = await wait_until(lambda: conn.closed, timeout=3.0)
            assert conn.peer_silent
            assert 0.2 <= waited <= 1.5, waited
            assert path.pool.dump() == []  # the next stream dials a fresh connection
            # The app's connection through it is reset, not left hanging.
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 2.0)
            writer.close()
            _, again = await echoed_stream(path)
            assert path.pool.dials == 2
            again.close()

    run(main())


def test_a_silent_client_is_given_up_and_its_upstream_connections_closed(run):
    async def main():
        async with mini_path(server_keepalive=FAST_KEEPALIVE) as path:
            _, writer = await echoed_stream(path)
            server_conn = path.server_conns[0]
            path.client_streams[0].conn.transport.pause_reading()
            await wait_until(lambda: server_conn.closed, timeout=3.0)
            assert server_conn.peer_silent
            # The server side's connection to the app (the echo server) is ended.
            await wait_until(lambda: path.echo_closed, timeout=2.0)
            writer.close()

    run(main())


def test_keepalive_settings_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        KeepaliveSettings(interval=0.0, timeout=1.0)
