"""What a stream holds while HTTP/2 cannot take it: kept as read, sent without copying.

Two HBONE connections joined in memory (no sockets): every byte one side's
transport is given is fed to the other side.
"""

from __future__ import annotations

import asyncio
import socket

import uvloop

from node_agent.proxy.hbone import H2Protocol, HboneStream, Headers, TcpPeer
from node_agent.proxy.http2.frames import FrameType
from node_agent.proxy.pieces import LARGE
from tests.unit.test_http2_connection import frames_in


class MemoryTransport(asyncio.Transport):
    """Keeps what is written, piece by piece, as the objects it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[object] = []
        self.peer: H2Protocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines([data])

    def writelines(self, list_of_data: object) -> None:
        self.pieces += list(list_of_data)  # type: ignore[call-overload]

    def take(self) -> bytes:
        data = b"".join(self.pieces)  # type: ignore[arg-type]
        self.pieces.clear()
        return data

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 1  # no socket to try first (TcpPeer.write_lent): every write comes here

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """(uvloop's looks the protocol's data_received up again; these tests call it.)"""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


Ends = tuple[tuple[H2Protocol, MemoryTransport], tuple[H2Protocol, MemoryTransport]]


async def flushed() -> None:
    """Until what the connections gathered so far is written: they flush two
    loop passes after the frames were made (H2Protocol._flush_now)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def shuttle(
    a: tuple[H2Protocol, MemoryTransport], b: tuple[H2Protocol, MemoryTransport]
) -> None:
    """Until neither side has anything more to send."""
    for _ in range(50):
        await flushed()
        moved = False
        for (_, src), (dst, _) in ((a, b), (b, a)):
            data = src.take()
            if data:
                moved = True
                dst.data_received(data)
        if not moved:
            return
    raise AssertionError("the two sides never went quiet")


async def joined_pair() -> tuple[Ends, list[HboneStream]]:
    """A client and a server HBONE connection joined in memory, past their SETTINGS;
    the server's streams are added to the list as their CONNECTs arrive."""
    served: list[HboneStream] = []

    def on_request(stream: HboneStream, _headers: Headers) -> None:
        served.append(stream)

    client = H2Protocol(client_side=True)
    server = H2Protocol(client_side=False, on_request=on_request)
    client_io, server_io = MemoryTransport(), MemoryTransport()
    client.connection_made(client_io)
    server.connection_made(server_io)
    ends = (client, client_io), (server, server_io)
    await shuttle(*ends)
    return ends, served


async def open_tunnel(ends: Ends, served: list[HboneStream]) -> tuple[HboneStream, HboneStream]:
    """A CONNECT answered 200: the client's stream and the server's."""
    (client, _), (server, _) = ends
    stream = client.open_stream("10.0.0.1:80")
    await shuttle(*ends)
    far = served.pop()
    server.respond(far, 200)
    await shuttle(*ends)
    assert (await stream.response)[b":status"] == b"200"
    return stream, far


def test_pending_pieces_leave_uncopied_when_large_and_joined_when_small() -> None:
    async def main() -> None:
        ends, served = await joined_pair()
        (client, client_io), _ = ends
        stream, far = await open_tunnel(ends, served)
        upstream_io = MemoryTransport()
        upstream = TcpPeer()
        upstream.connection_made(upstream_io)
        far.attach(upstream)
        stream.attach(TcpPeer())

        client.pause_writing()  # the TLS socket is full: what TCP reads waits in the stream
        big = bytes(range(256)) * 1024
        reads = [b"a" * 100, b"b" * 100, big, b"c" * 10]
        for data in reads:
            stream.on_data(data)
        assert client_io.pieces == []
        client.resume_writing()
        await flushed()

        # Two small reads became one frame; the large one went out as the object read.
        assert any(piece is big for piece in client_io.pieces)
        assert sum(len(p) < LARGE for p in client_io.pieces) == 2  # before and after it
        await shuttle(*ends)
        assert upstream_io.take() == b"".join(reads)

    uvloop.run(main())


def test_a_lent_write_survives_its_buffer_being_reused() -> None:
    """What the socket does not take at once is copied for the transport: the
    lender may overwrite its buffer as soon as write_lent returns."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        theirs.setblocking(False)
        peer = TcpPeer()
        await loop.connect_accepted_socket(lambda: peer, ours)
        assert peer.transport is not None
        try:
            buffer = bytearray(b"x" * (2 << 20))
            peer.write_lent(memoryview(buffer))
            assert peer.transport.get_write_buffer_size() > 0  # the socket took only part
            buffer[:] = b"y" * len(buffer)  # reused, as the TLS read buffer is
            peer.write_lent(memoryview(buffer)[:10])  # behind the queue, in order
            received = bytearray()
            async with asyncio.timeout(10):
                while len(received) < (2 << 20) + 10:
                    received += await loop.sock_recv(theirs, 1 << 20)
            assert received == b"x" * (2 << 20) + b"y" * 10
            assert peer.transport.get_write_buffer_size() == 0
        finally:
            peer.abort()
            theirs.close()

    uvloop.run(main())


def test_frames_made_in_the_next_loop_pass_join_the_same_write() -> None:
    """A busy proxy's next pass handles what arrived meanwhile: its frames go out
    with those already gathered, in one TLS write instead of two."""

    async def main() -> None:
        ends, _served = await joined_pair()
        (client, client_io), _ = ends
        writes: list[int] = []
        write_pieces = client_io.writelines

        def counted(list_of_data: object) -> None:
            writes.append(1)
            write_pieces(list_of_data)

        client_io.writelines = counted  # type: ignore[method-assign]
        client.open_stream("10.0.0.1:80")
        await asyncio.sleep(0)  # a pass later: another connection's CONNECT
        client.open_stream("10.0.0.2:80")
        assert writes == []
        await flushed()
        assert writes == [1]
        headers = [(t, s) for t, _, s, _ in frames_in(client_io.take()) if t == FrameType.HEADERS]
        assert headers == [(FrameType.HEADERS, 1), (FrameType.HEADERS, 3)]  # both CONNECTs
        await flushed()
        assert writes == [1]  # nothing left over for another write

    uvloop.run(main())
