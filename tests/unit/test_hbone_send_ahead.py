"""A TCP side's first bytes sent right behind the CONNECT, before its answer.

The client side (outbound) sends what the app wrote before the tunnel was
up together with the request; the server side (inbound) holds it until its
TCP side is attached, and gives the connection's window back when it never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable

from node_agent.proxy.hbone import CONNECTION_WINDOW, H2Protocol, HboneStream, Headers, TcpPeer

LOCAL = "127.0.0.1"


@contextlib.asynccontextmanager
async def tunnel(
    on_request: Callable[[HboneStream, Headers], None],
) -> AsyncIterator[H2Protocol]:
    """A client HTTP/2 connection to a server whose requests go to `on_request`."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: H2Protocol(client_side=False, on_request=on_request), LOCAL, 0
    )
    client = H2Protocol(client_side=True)
    await loop.create_connection(lambda: client, LOCAL, server.sockets[0].getsockname()[1])
    try:
        yield client
    finally:
        client.close()
        server.close()


async def app_connection(payload: bytes) -> tuple[TcpPeer, asyncio.StreamReader]:
    """The proxy's side of an app connection whose first `payload` bytes have arrived."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[TcpPeer] = loop.create_future()
    listener = await loop.create_server(lambda: TcpPeer(accepted.set_result), LOCAL, 0)
    reader, writer = await asyncio.open_connection(LOCAL, listener.sockets[0].getsockname()[1])
    writer.write(payload)
    writer.write_eof()
    peer = await accepted
    listener.close()
    for _ in range(5000):
        if len(peer.early_data()) == len(payload):
            break
        await asyncio.sleep(0.001)
    assert peer.early_data() == payload
    return peer, reader


async def echo_upstream() -> tuple[TcpPeer, list[bytes], asyncio.Server]:
    """A TcpPeer connected to an echo server; what the server received goes to the list."""
    loop = asyncio.get_running_loop()
    received: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        received.append(data)
        writer.write(data)
        writer.write_eof()
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, LOCAL, 0)
    _, upstream = await loop.create_connection(TcpPeer, LOCAL, server.sockets[0].getsockname()[1])
    return upstream, received, server


def test_bytes_sent_ahead_reach_the_upstream_once_and_are_counted_once(run):
    payload = os.urandom(3000)

    async def main():
        server_streams: list[HboneStream] = []
        seen_ahead: list[int] = []

        def on_request(stream: HboneStream, _headers: Headers) -> None:
            server_streams.append(stream)

        async with tunnel(on_request) as client:
            peer, app = await app_connection(payload)
            stream = client.open_stream("10.0.0.1:80")
            stream.send_ahead(peer.early_data())
            for _ in range(5000):
                if server_streams and server_streams[0]._early:
                    break
                await asyncio.sleep(0.001)
            (served,) = server_streams
            # The server has the bytes before it answered: they came with the request.
            seen_ahead.append(sum(map(len, served._early)))
            upstream, received, echo = await echo_upstream()
            served.conn.respond(served, 200)
            served.attach(upstream)
            assert (await stream.response)[b":status"] == b"200"
            stream.attach(peer)
            assert await app.read(-1) == payload
            assert await stream.flow.done is None
            assert await served.flow.done is None
            echo.close()
        assert seen_ahead == [len(payload)]
        assert received == [payload]  # once: the app's early bytes were not sent again
        assert (stream.flow.up, stream.flow.down) == (len(payload), len(payload))
        assert (served.flow.up, served.flow.down) == (len(payload), len(payload))

    run(main())


def test_refused_streams_that_carried_bytes_ahead_give_the_connection_window_back(run):
    # More than the connection's whole window goes to streams that are refused:
    # unless each refusal hands its bytes' window back, the tunnel stalls.
    piece = os.urandom(1 << 20)
    refusals = CONNECTION_WINDOW // len(piece) + 4

    async def main():
        held: list[int] = []

        async def serve(stream: HboneStream) -> None:
            for _ in range(5000):  # the bytes sent ahead arrive before the refusal
                if sum(map(len, stream._early)) == len(piece):
                    break
                await asyncio.sleep(0.001)
            held.append(sum(map(len, stream._early)))
            stream.conn.respond(stream, 403)

        tasks: set[asyncio.Task[None]] = set()

        def on_request(stream: HboneStream, _headers: Headers) -> None:
            tasks.add(asyncio.get_running_loop().create_task(serve(stream)))

        async with tunnel(on_request) as client:
            for _ in range(5000):  # the server's SETTINGS raise the frame size to take a piece
                if client.h2.remote_max_frame_size >= len(piece):
                    break
                await asyncio.sleep(0.001)
            for _ in range(refusals):
                stream = client.open_stream("10.0.0.1:80")
                stream.send_ahead(piece)
                assert stream._sent_ahead == len(piece), "the window ran out: it leaked"
                assert (await stream.response)[b":status"] == b"403"
            await asyncio.gather(*tasks)
        assert held == [len(piece)] * refusals

    run(main())
