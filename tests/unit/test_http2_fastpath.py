"""The HBONE data path in C (_fastpath.c) against its Python path.

Received DATA: the same frames go to two server-side connections, over real
sockets. In one the stream has a TCP side attached (the C path writes to its
socket), in the other it has none (the Python path hands each payload to the
events, which acknowledge it as HboneStream does). Bytes, windows and window
updates must come out the same.

Reads of a TCP side (DataSender): HBONE connections joined in memory, as
tests/unit/test_hbone_pending.py does; what C does not send must take the
Python path, in order.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import uvloop

from node_agent.proxy.hbone import HboneStream, TcpPeer
from node_agent.proxy.http2 import frames
from node_agent.proxy.http2._fastpath import DataSender, StreamState, deliver_data
from node_agent.proxy.http2.connection import Connection, ProtocolError
from node_agent.proxy.http2.frames import END_STREAM, PADDED, ErrorCode, FrameType
from tests.unit.test_connection_cycles import peer_in_memory
from tests.unit.test_hbone_pending import (
    Ends,
    MemoryTransport,
    flushed,
    joined_pair,
    open_tunnel,
    shuttle,
)
from tests.unit.test_http2_connection import CONNECT, Recorder, frames_in, ours

WINDOW = 64 * 1024  # per stream; the connection's is four times that


@dataclass
class SocketRecorder(Recorder):
    """The Python path's receiver: writes the data of a stream in `tcp` to that socket,
    as HboneStream does, and records the rest as Recorder does; acknowledges it all."""

    tcp: dict[int, socket.socket] = field(default_factory=dict)

    def on_data(self, stream_id: int, data: memoryview) -> None:
        sock = self.tcp.get(stream_id)
        if sock is None:
            super().on_data(stream_id, data)
            return
        sock.sendall(data)
        assert self.conn is not None
        self.conn.acknowledge(stream_id, len(data))


class Transport:
    """What the C path asks of uvloop's transport; `queued` stands for its buffer."""

    def __init__(self) -> None:
        self.closing = False
        self.queued = bytearray()
        self.on_write: list[Callable[[], None]] = []

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return len(self.queued)

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)  # a copy: what it was lent is reused
        self.queued += data
        for hook in self.on_write:
            hook()


@dataclass
class Peer:
    """A TcpPeer as the C path sees it."""

    transport: Transport | None
    fd: int
    lost: bool = False


@dataclass
class Flow:
    up: int = 0
    down: int = 0


def opened(stream_ids: tuple[int, ...] = (1,)) -> tuple[Connection, SocketRecorder]:
    """A server connection past its handshake, with `stream_ids` open."""
    client, _ = ours(client_side=True, window=WINDOW)
    for _ in stream_ids:
        client.open_stream(CONNECT)
    server, events = ours(client_side=False, window=WINDOW, recorder=SocketRecorder())
    server.receive(client.data_to_send())
    server.data_to_send()
    assert isinstance(events, SocketRecorder)
    return server, events


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return frames.frame_header(len(payload), FrameType.DATA, flags, stream_id) + payload


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def attach(conn: Connection, stream_id: int, sock: socket.socket, flow: Flow) -> Peer:
    peer = Peer(Transport(), sock.fileno())
    state = conn.streams[stream_id]
    state.peer = peer
    state.flow = flow
    return peer


@dataclass
class Attached:
    """Stream 1 of a server connection, its TCP side a socketpair's end (C writes there)."""

    server: Connection
    events: SocketRecorder
    peer: Peer
    flow: Flow
    ours: socket.socket
    theirs: socket.socket


@pytest.fixture
def attached(sockets: tuple[socket.socket, socket.socket]) -> Attached:
    ours, theirs = sockets
    server, events = opened()
    flow = Flow()
    return Attached(server, events, attach(server, 1, ours, flow), flow, ours, theirs)


def drain(sock: socket.socket) -> bytes:
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def test_attached_streams_get_their_bytes_and_the_same_window_updates_as_the_python_path(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = sockets
    fast, fast_events = opened((1, 3))
    slow, slow_events = opened((1, 3))
    flow = Flow()
    attach(fast, 1, ours, flow)  # stream 3 has no TCP side: Python's, in both
    fast_events.tcp[1] = ours  # frames cut across reads are Python's too
    payloads = [bytes([65 + i % 26]) * (3000 + 977 * i) for i in range(24)]
    wire = b"".join(data_frame(1 if i % 3 else 3, p) for i, p in enumerate(payloads))
    received = bytearray()
    for start in range(0, len(wire), 40_000):  # as TLS reads might cut it
        fast.receive(wire[start : start + 40_000])
        slow.receive(wire[start : start + 40_000])
        received += drain(theirs)
    to_stream_1 = b"".join(p for i, p in enumerate(payloads) if i % 3)
    assert received == to_stream_1 == slow_events.data[1]
    assert fast_events.data[3] == slow_events.data[3]
    assert fast.data_to_send() == slow.data_to_send() != b""  # window updates, in order
    for stream_id in (1, 3):
        assert fast.streams[stream_id].recv_available == slow.streams[stream_id].recv_available
        assert fast.streams[stream_id].recv_unacked == slow.streams[stream_id].recv_unacked
    assert 0.5 * len(to_stream_1) < flow.up < len(to_stream_1)  # whole frames went from C


def test_a_run_stops_where_python_is_needed_and_goes_on_after_it(attached: Attached) -> None:
    server, events = attached.server, attached.events
    padded = frames.frame_header(6, FrameType.DATA, PADDED, 1) + b"\x02pad\0\0"
    server.receive(
        data_frame(1, b"one ")
        + frames.ping(b"12345678", ack=False)
        + data_frame(1, b"two ")
        + padded
        + data_frame(1, b"three ")
        + data_frame(1, b"last", END_STREAM)
    )
    # C wrote what it could; the padded frame and the stream's last one went to Python.
    assert drain(attached.theirs) == b"one two three "
    assert events.data[1] == b"pad" + b"last"
    assert events.named("end") == [("end", 1)]
    assert server.data_to_send().startswith(frames.ping(b"12345678", ack=True))


def test_a_frame_cut_across_reads_is_left_to_python(attached: Attached) -> None:
    frame = data_frame(1, b"x" * 1000)
    attached.server.receive(frame[:500])
    attached.server.receive(frame[500:] + data_frame(1, b"after"))
    assert attached.events.data[1] == b"x" * 1000
    assert drain(attached.theirs) == b"after"


def test_a_congested_tcp_side_holds_the_window_back(attached: Attached) -> None:
    server = attached.server
    state = server.streams[1]
    state.peer_congested = True
    server.receive(data_frame(1, b"y" * (WINDOW // 2)))
    assert drain(attached.theirs) == b"y" * (WINDOW // 2)
    assert state.held_acks == WINDOW // 2
    assert state.recv_available == WINDOW // 2
    assert server.data_to_send() == b""  # no window back until the TCP side drains


def test_what_the_socket_does_not_take_is_copied_to_the_transport_in_order(
    attached: Attached,
) -> None:
    server, peer = attached.server, attached.peer
    assert peer.transport is not None
    attached.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunk = bytes(range(256)) * 64  # 16 KiB, within the stream window
    frame_count = 0
    while not peer.transport.queued and frame_count < 64:
        server.receive(data_frame(1, chunk))
        server.data_to_send()
        frame_count += 1
    assert peer.transport.queued, "the socket never filled"
    # With the transport holding bytes, the next frame goes behind them, not to the socket.
    queued = len(peer.transport.queued)
    server.receive(data_frame(1, b"tail"))
    assert bytes(peer.transport.queued[queued:]) == b"tail"
    received = drain(attached.theirs) + bytes(peer.transport.queued)
    assert received == chunk * frame_count + b"tail"


def test_a_closing_or_lost_tcp_side_gets_nothing_but_the_window_is_handed_back(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = sockets
    for how in ("closing", "lost", "no transport"):
        server, _ = opened()
        flow = Flow()
        peer = attach(server, 1, ours, flow)
        server.streams[1].count_down = True
        if how == "closing":
            assert peer.transport is not None
            peer.transport.closing = True
        elif how == "lost":
            peer.lost = True
        else:
            peer.transport = None
        server.receive(data_frame(1, b"z" * WINDOW))
        assert drain(theirs) == b"", how
        assert flow == Flow(down=WINDOW), how
        assert server.data_to_send() == frames.window_update(0, WINDOW) + frames.window_update(
            1, WINDOW
        ), how


def test_a_stream_forgotten_during_the_write_gets_no_stream_window_back(
    attached: Attached,
) -> None:
    server, peer = attached.server, attached.peer
    assert peer.transport is not None
    peer.transport.queued += b"waiting"  # so the frame goes through transport.write
    peer.transport.on_write.append(lambda: server.reset_stream(1, ErrorCode.CANCEL))
    server.receive(data_frame(1, b"w" * WINDOW))
    assert 1 not in server.streams
    # The reset, then the connection's window only: the stream's is gone with it.
    assert server.data_to_send() == frames.rst_stream(1, ErrorCode.CANCEL) + frames.window_update(
        0, WINDOW
    )


def test_before_its_fd_is_known_a_stream_is_left_to_python(attached: Attached) -> None:
    attached.peer.fd = -1
    attached.server.receive(data_frame(1, b"early"))
    assert attached.events.data[1] == b"early"
    assert drain(attached.theirs) == b""


def test_flow_control_faults_are_still_raised_by_the_codec(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = sockets
    server, _ = opened((1, 3, 5, 7, 9))
    flows = [Flow() for _ in range(5)]
    for stream_id, flow in zip((1, 3, 5, 7, 9), flows, strict=True):
        attach(server, stream_id, ours, flow)
        server.streams[stream_id].peer_congested = True  # nothing handed back
    wire = b"".join(data_frame(s, b"q" * WINDOW) for s in (1, 3, 5, 7, 9))
    with pytest.raises(ProtocolError) as raised:
        server.receive(wire)
    assert raised.value.code == ErrorCode.FLOW_CONTROL_ERROR
    assert [flow.up for flow in flows] == [WINDOW] * 4 + [0]  # the four that fit, no more


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="9 arguments"):
        deliver_data(b"", 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="must be a dict"):
        deliver_data(b"", 0, [], 0, 0, 1, 1, 16384, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside the data"):
        deliver_data(b"abc", 4, {}, 0, 0, 1, 1, 16384, [])


# -- the TCP side's reads: DataSender ---------------------------------------------------


async def attached_tunnel() -> tuple[Ends, HboneStream, TcpPeer, MemoryTransport]:
    """A tunnel up in memory, its client stream attached to a TCP side, the server's
    to an upstream whose transport keeps what it is given."""
    ends, served = await joined_pair()
    stream, far = await open_tunnel(ends, served)
    upstream_io = MemoryTransport()
    upstream = TcpPeer()
    upstream.connection_made(upstream_io)
    far.attach(upstream)
    peer, _ = peer_in_memory()
    stream.attach(peer)
    return ends, stream, peer, upstream_io


def test_reads_go_out_as_one_data_frame_each_and_in_one_flush() -> None:
    async def main() -> None:
        ends, stream, peer, upstream_io = await attached_tunnel()
        (client, client_io), (server, _) = ends
        assert isinstance(vars(peer)["data_received"], DataSender)
        state = client.h2.streams[stream.id]
        window, stream_window = client.h2._send_window, state.send_window
        big = bytes(range(256)) * 256  # 64 KiB: queued as the object read
        for data in (b"first", b"second", big):
            peer.data_received(data)
        assert client_io.pieces == []  # nothing before the connection flushes
        await asyncio.sleep(0)
        assert client_io.pieces == []  # nor a pass later: what that pass reads may join
        await asyncio.sleep(0)
        assert any(piece is big for piece in client_io.pieces)
        wire = client_io.take()
        sent = frames_in(wire)
        assert [(t, f, s) for t, f, s, _ in sent] == [(FrameType.DATA, 0, stream.id)] * 3
        assert [p for *_, p in sent] == [b"first", b"second", big]
        size = 5 + 6 + len(big)
        assert (client.h2._send_window, state.send_window) == (window - size, stream_window - size)
        assert stream.flow.up == size  # the TCP side opened this connection: its bytes go up
        server.data_received(wire)
        await shuttle(*ends)
        assert upstream_io.take() == b"firstsecond" + big

    uvloop.run(main())


def test_reads_the_c_path_cannot_send_now_take_the_python_path() -> None:
    async def main() -> None:
        ends, stream, peer, upstream_io = await attached_tunnel()
        (client, client_io), (server, _) = ends
        state = client.h2.streams[stream.id]

        client.pause_writing()  # the TLS side is full: the read waits in the stream
        peer.data_received(b"waits")
        peer.data_received(b"behind it")  # in order: after what waits
        assert list(stream._pending) == [b"waits", b"behind it"]
        client.resume_writing()

        window = state.send_window
        state.send_window = 3  # less window than the read: Python frames what fits
        peer.data_received(b"split")
        assert list(stream._pending) == [b"it"]

        await flushed()
        wire = client_io.take()
        assert [p for *_, p in frames_in(wire)] == [
            b"waitsbehind it",
            b"spl",
        ]  # small runs joined
        server.data_received(wire)
        await shuttle(*ends)
        assert upstream_io.take() == b"waitsbehind itspl"
        assert stream.flow.up == len(b"waitsbehind itsplit")
        assert state.send_window == 0 < window

    uvloop.run(main())


def test_once_the_stream_is_finished_reads_go_to_python_and_the_peer_lets_go() -> None:
    async def main() -> None:
        _, stream, peer, _ = await attached_tunnel()
        stream.reset("test")
        assert stream._state.peer is None
        peer.data_received(b"late")  # the Python path, which the stream ignores now
        await asyncio.sleep(0)  # the transport reports the abort
        assert peer.lost
        assert "data_received" not in vars(peer)

    uvloop.run(main())


def test_a_sender_wants_a_stream_state_and_a_stream_id() -> None:
    with pytest.raises(TypeError):
        DataSender(object(), 1, object(), object(), object())  # type: ignore[arg-type]
    state = StreamState(local=True, send_window=1, recv_window=1)
    with pytest.raises(ValueError, match="not a stream id"):
        DataSender(state, 0, object(), object(), object())
