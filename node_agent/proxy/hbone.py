"""HBONE: TCP connections carried as HTTP/2 CONNECT streams over one mTLS connection.

`H2Protocol` is one HTTP/2 connection (either side) over our own codec
(node_agent.proxy.http2). Each CONNECT stream is an `HboneStream`, bridged to one
plain TCP connection (`TcpPeer`). Flow control is end to end: bytes from
HTTP/2 are acknowledged (window handed back) only once the TCP side has
taken them, and a TCP side is paused while its stream has no window. Windows
start large (4 MiB per stream, 16 MiB per connection) so a single stream can
fill a fast link.

`Relay` is the same bridge for TCP to TCP (pass-through, inbound plaintext).
"""

from __future__ import annotations

import asyncio

# mypyc: TcpPeer, a Python class deriving from asyncio.Protocol, needs the
# defining module imported by name, or the compiled module does not build.
import asyncio.protocols
import collections
import os
import time
from collections.abc import Callable
from typing import Final, Protocol, cast

from mypy_extensions import mypyc_attr

from node_agent.proxy.http2._fastpath import DataSender
from node_agent.proxy.http2.connection import Connection, HeaderList, ProtocolError
from node_agent.proxy.http2.frames import ErrorCode
from node_agent.proxy.http2.keepalive import Keepalive, KeepaliveSettings
from node_agent.proxy.pieces import LARGE, Bytes
from weir_common.mesh import SpiffeId

STREAM_WINDOW: Final = 4 * 1024 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
# Frames we accept; fewer, larger frames cost less Python per byte.
MAX_FRAME_SIZE: Final = 1024 * 1024
# A TCP side is paused when this much of its data waits for HTTP/2 window.
PENDING_HIGH: Final = 1024 * 1024
PENDING_LOW: Final = 256 * 1024
MAX_CONCURRENT_STREAMS: Final = 1000

Headers = dict[bytes, bytes]


class Pipe(Protocol):
    """Where a TcpPeer's events go."""

    def on_data(self, data: Bytes) -> None: ...
    def on_eof(self) -> None: ...
    def on_lost(self, exc: Exception | None) -> None: ...
    def on_write_paused(self) -> None: ...
    def on_write_resumed(self) -> None: ...


# A Python class, not a compiled one, even compiled (setup.py): read_with gives
# each instance its own data_received, which a compiled class has no room for.
@mypyc_attr(native_class=False)
class TcpPeer(asyncio.Protocol):
    """One plain TCP connection. Reading stays paused until a pipe is attached."""

    def __init__(self, on_connected: Callable[[TcpPeer], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.pipe: Pipe | None = None
        self.lost = False
        self._on_connected = on_connected
        self._early = bytearray()
        self._early_eof = False
        self._lost_error: Exception | None = None
        self.fd = -1  # the socket's (socket_fd) once looked up, unless set

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        if self._on_connected is not None:
            self._on_connected(self)

    def early_data(self) -> bytes:
        """What arrived before a pipe was attached, copied (the buffer grows until then)."""
        return bytes(self._early) if self._early else b""

    def attach(self, pipe: Pipe, *, sent_ahead: int = 0) -> None:
        """Hand reads to `pipe`, first those that came early, less the first `sent_ahead`
        bytes of them, which the pipe already carried (HboneStream.send_ahead)."""
        self.pipe = None if self.lost else pipe
        early, self._early = self._early, bytearray()
        if len(early) > sent_ahead:
            pipe.on_data(bytes(memoryview(early)[sent_ahead:]) if sent_ahead else bytes(early))
        if self._early_eof:
            pipe.on_eof()
        if self.lost:
            pipe.on_lost(self._lost_error)
        elif self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.pipe is not None:
            self.pipe.on_data(data)
            return
        # uvloop may deliver a first read even when connection_made paused reading.
        self._early += data
        self.pause_reading()

    def eof_received(self) -> bool:
        if self.pipe is not None:
            self.pipe.on_eof()
        else:
            self._early_eof = True
        return True  # keep the write side open: TCP half-close is carried through

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._lost_error = exc
        # A receiver given to read_with holds this peer: let go of it too.
        self.__dict__.pop("data_received", None)
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            # Let go of the pipe: it holds this peer too (a stream, a relay), and
            # a cycle of them per connection would be freed only by the cyclic
            # GC, which then spent 7 % of a busy proxy's CPU on connection churn.
            pipe.on_lost(exc)

    def read_with(self, receiver: Callable[[bytes], None]) -> None:
        """Have the transport give each read to `receiver` instead of to data_received.

        uvloop calls the data_received it found when the protocol was set, so
        the protocol is set again: a receiver written in C then runs no Python
        per read. The receiver calls data_received for what it does not take.
        """
        if self.transport is None or self.lost:
            return
        self.__dict__["data_received"] = receiver
        self.transport.set_protocol(self)

    def pause_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.on_write_paused()

    def resume_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.on_write_resumed()

    def write(self, data: Bytes) -> None:
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def write_lent(self, data: Bytes) -> None:
        """Write `data`, which is only valid until this returns.

        uvloop's transport keeps what the socket cannot take yet as the object
        it was given, so a lent view would change under it. The socket is
        tried here first, and only what it does not take is copied for the
        transport; with the transport's own queue empty, order is kept.
        """
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return
        sent = 0
        if not transport.get_write_buffer_size():
            # Would block: the rest waits in the transport. Failed: the
            # transport meets the error itself on its write, and reports it.
            # Not contextlib.suppress: three Python calls on every write.
            try:  # noqa: SIM105
                sent = os.write(self.socket_fd(), data)
            except OSError:
                pass
        if sent < len(data):
            transport.write(bytes(data[sent:]))

    def socket_fd(self) -> int:
        """The connection's socket, for calls the transport does not offer.

        Looked up once: uvloop answers with a getsockname(2) and a new object.
        """
        if self.fd < 0:
            assert self.transport is not None
            self.fd = self.transport.get_extra_info("socket").fileno()
        return self.fd

    def write_eof(self) -> None:
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Flow:
    """Completion and byte counts of one bridged connection.

    `up` is bytes from the side that opened the connection towards the other
    side, `down` the reverse. `done` resolves to None on a clean end (both
    directions closed), or to why it ended otherwise.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.up = 0
        self.down = 0
        self.done: asyncio.Future[str | None] = loop.create_future()

    def finish(self, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result(error)


class Relay:
    """TCP to TCP, both directions, with half-close and backpressure."""

    def __init__(self, downstream: TcpPeer, upstream: TcpPeer) -> None:
        self.flow = Flow(asyncio.get_running_loop())
        self._eofs = 0
        downstream.attach(_RelayHalf(self, downstream, upstream, upward=True))
        upstream.attach(_RelayHalf(self, upstream, downstream, upward=False))
        self._peers = (downstream, upstream)

    def _eof(self) -> None:
        self._eofs += 1
        if self._eofs == 2:
            self._end(None)

    def _end(self, error: str | None) -> None:
        for peer in self._peers:
            if error is None:
                peer.close()
            else:
                peer.abort()
        self.flow.finish(error)


class _RelayHalf:
    def __init__(self, relay: Relay, src: TcpPeer, dst: TcpPeer, *, upward: bool) -> None:
        self._relay = relay
        self._src = src
        self._dst = dst
        self._upward = upward
        self._eof = False

    def on_data(self, data: Bytes) -> None:
        if self._upward:
            self._relay.flow.up += len(data)
        else:
            self._relay.flow.down += len(data)
        self._dst.write(data)

    def on_eof(self) -> None:
        self._eof = True
        self._dst.write_eof()
        self._relay._eof()

    def on_lost(self, exc: Exception | None) -> None:
        if exc is not None or not self._eof:
            side = "client" if self._upward else "upstream"
            self._relay._end(f"{side} connection lost: {exc or 'closed before EOF'}")

    def on_write_paused(self) -> None:
        self._dst.pause_reading()

    def on_write_resumed(self) -> None:
        self._dst.resume_reading()


class HboneStream:
    """One CONNECT stream, bridged to a TcpPeer once the tunnel is up.

    `upward` says which way `flow.up` counts: on the client side (outbound
    proxy) the TCP peer is the one that opened the connection; on the server
    side (inbound proxy) the HTTP/2 side did.
    """

    def __init__(self, conn: H2Protocol, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.flow = Flow(conn.loop)
        self.response: asyncio.Future[Headers] = conn.loop.create_future()
        # The codec's state of this stream: once the TCP side is attached, the
        # codec writes DATA to it from C, holding acknowledgements while the
        # TCP side is congested (peer_congested, held_acks), as _on_h2_data does.
        self._state = conn.h2.streams[stream_id]
        self._peer: TcpPeer | None = None
        # From TCP, waiting for HTTP/2 window: the pieces as read, not copied together.
        self._pending: collections.deque[Bytes] = collections.deque()
        self._pending_size = 0
        self._early: list[Bytes] = []  # from HTTP/2 before a peer was attached
        self._reading_paused = False
        self._tcp_eof = False
        self._sent_end = False
        self._remote_end = False
        self._tcp_opened = conn.client_side  # which way the TCP side's bytes count
        self._sent_ahead = 0  # the TCP side's first bytes, sent right behind the request

    def send_ahead(self, data: bytes) -> None:
        """Send `data`, the first bytes of the TCP side to be attached, now, right
        behind the CONNECT instead of a round trip later, once it is answered.

        The request and its first bytes leave in one write, and the destination
        has them when its connection to the workload is up: in a short exchange
        its answer then travels with the 200. A destination that refuses drops
        them; the TCP side still holds them (TcpPeer.early_data) for another
        endpoint's stream. Nothing is sent unless all of `data` fits the windows
        and one frame.
        """
        conn = self.conn
        if (
            data
            and not self._sent_ahead
            and not conn.write_paused
            and not conn.closed
            and conn.h2.try_send_data(self.id, data)
        ):
            self._sent_ahead = len(data)
            conn.flush()

    def attach(self, peer: TcpPeer) -> None:
        """Start bridging: deliver what arrived early, then let the TCP side read."""
        self._peer = peer
        if self._sent_ahead:
            if self._tcp_opened:
                self.flow.up += self._sent_ahead
            else:
                self.flow.down += self._sent_ahead
        for data in self._early:
            self._on_h2_data(data)
        self._early.clear()
        if self._remote_end:
            peer.write_eof()
        elif not self.flow.done.done():
            # From here on, DATA for this stream goes to the TCP side from C
            # (_fastpath.c), and so do the TCP side's reads, when they can.
            state = self._state
            state.flow = self.flow
            state.count_down = self._tcp_opened
            state.peer = peer
            peer.read_with(DataSender(state, self.id, peer, self, self.conn))
        peer.attach(self, sent_ahead=self._sent_ahead)
        self._maybe_finish()

    def reset(self, reason: str, code: int = ErrorCode.CANCEL) -> None:
        """Abort both sides."""
        self.conn.reset_stream(self.id, code)
        if self._peer is not None:
            self._peer.abort()
        self._finish(reason)

    # -- Pipe: events from the TCP side -----------------------------------

    def on_data(self, data: Bytes) -> None:
        # On the client side the TCP side opened the connection: its bytes go up.
        if self._tcp_opened:
            self.flow.up += len(data)
        else:
            self.flow.down += len(data)
        conn = self.conn
        # The common case, without copying through the pending buffer: it all fits now.
        if (
            not self._pending
            and not conn.write_paused
            and not conn.closed
            and conn.h2.try_send_data(self.id, data)
        ):
            conn.flush()
            return
        self._pending.append(data)
        self._pending_size += len(data)
        self._flush()
        if self._pending_size > PENDING_HIGH and self._peer is not None:
            self._reading_paused = True
            self._peer.pause_reading()

    def on_eof(self) -> None:
        self._tcp_eof = True
        self._flush()

    def on_lost(self, exc: Exception | None) -> None:
        if exc is not None or not (self._tcp_eof and self._remote_end):
            self.reset(f"TCP side lost: {exc or 'closed before the stream ended'}")

    def on_write_paused(self) -> None:
        self._state.peer_congested = True

    def on_write_resumed(self) -> None:
        state = self._state
        state.peer_congested = False
        if state.held_acks:
            self.conn.ack(self.id, state.held_acks)
            state.held_acks = 0

    # -- events from the HTTP/2 connection ---------------------------------

    def _on_h2_data(self, data: Bytes) -> None:
        peer = self._peer
        if peer is None:
            self._early.append(bytes(data))  # `data` may be lent (H2Protocol.data_received)
            return
        size = len(data)
        if self._tcp_opened:
            self.flow.down += size
        else:
            self.flow.up += size
        peer.write_lent(data)
        state = self._state
        if state.peer_congested:
            state.held_acks += size
            return
        conn = self.conn  # conn.ack, inlined: this runs for every DATA frame
        if not conn.closed and conn.h2.acknowledge(self.id, size):
            conn.flush()

    def _on_h2_end(self) -> None:
        self._remote_end = True
        if self._peer is not None:
            self._peer.write_eof()
            self._maybe_finish()

    def _refuse_response(self, why: str) -> None:
        if not self.response.done():
            self.response.set_exception(StreamRefusedError(why))
            # Marked as seen: whoever awaits it still gets the error, and a
            # stream nobody was waiting on does not log "never retrieved".
            self.response.exception()

    def _on_h2_reset(self, code: int) -> None:
        self._refuse_response(f"stream reset (code {code})")
        if self._peer is not None:
            self._peer.abort()
        self._finish(f"stream reset by peer (HTTP/2 error {code})")

    def _on_connection_lost(self, why: str) -> None:
        self._refuse_response(why)
        if self._peer is not None:
            self._peer.abort()
        self._finish(why)

    def _flush(self) -> None:
        conn = self.conn
        codec = conn.h2
        pending = self._pending
        while pending and not conn.write_paused and not conn.closed:
            limit = min(codec.send_window(self.id), codec.remote_max_frame_size)
            if limit <= 0:
                break
            codec.send_data(self.id, self._take_pending(limit))
        if self._tcp_eof and not pending and not self._sent_end and not conn.closed:
            if self.id not in codec.streams:
                # Reset or refused while the TCP side still had data for it.
                if self._peer is not None:
                    self._peer.abort()
                self._finish("HTTP/2 stream can no longer carry data")
                return
            codec.end_stream(self.id)
            self._sent_end = True
        conn.flush()
        if self._reading_paused and self._pending_size < PENDING_LOW and self._peer is not None:
            self._reading_paused = False
            self._peer.resume_reading()
        self._maybe_finish()

    def _take_pending(self, limit: int) -> Bytes:
        """At most `limit` pending bytes for one DATA frame: the first piece (or as much of
        it as fits) when it is large or alone, else the small pieces that fit, joined."""
        pending = self._pending
        first = pending[0]
        run: list[Bytes] = []
        if len(first) < LARGE and len(pending) > 1:
            size = 0
            while pending and len(pending[0]) < LARGE and size + len(pending[0]) <= limit:
                size += len(pending[0])
                run.append(pending.popleft())
        if len(run) > 1:
            taken: Bytes = b"".join(run)
        elif run:
            taken = run[0]
        elif len(first) <= limit:
            taken = pending.popleft()
        else:
            view = memoryview(first)
            taken, pending[0] = view[:limit], view[limit:]
        self._pending_size -= len(taken)
        return taken

    def _maybe_finish(self) -> None:
        if self._sent_end and self._remote_end and self._peer is not None:
            self._peer.close()
            self._finish(None)

    def _finish(self, error: str | None) -> None:
        if self.flow.done.done():
            return
        self._state.peer = self._state.flow = None
        if self._early:
            # Never taken by a TCP side (refused, reset, ended before attach): the
            # connection's window goes back, or every refused stream that came with
            # data (sent ahead of its answer) would shrink it for good.
            self.conn.ack(self.id, sum(map(len, self._early)))
            self._early.clear()
        self.flow.finish(error)
        self.conn.stream_finished(self)


class StreamRefusedError(Exception):
    """The peer would not (or could no longer) carry a stream."""


class H2Protocol(asyncio.Protocol):
    """One HTTP/2 connection over an established TLS transport.

    Draining (`shutdown`) sends GOAWAY: the peer opens no new streams here,
    the open ones run to their end, and the connection closes after the last.
    A GOAWAY received does the same from the other side: no new streams on
    this connection (streams the peer never saw fail as refused, safe to
    retry elsewhere); those it covers go on.

    With `keepalive`, a peer silent for its interval is sent a PING, and one
    that answers nothing within its timeout is taken for dead: the connection
    is aborted (`peer_silent`), its streams reset, the pool forgets it.
    """

    def __init__(
        self,
        *,
        client_side: bool,
        on_request: Callable[[HboneStream, Headers], None] | None = None,
        on_idle: Callable[[H2Protocol], None] | None = None,
        on_closed: Callable[[H2Protocol, str | None], None] | None = None,
        keepalive: KeepaliveSettings | None = None,
    ) -> None:
        self.client_side = client_side
        self.h2 = Connection(
            self,
            client_side=client_side,
            stream_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
            max_frame_size=MAX_FRAME_SIZE,
            max_concurrent_streams=MAX_CONCURRENT_STREAMS,
        )
        self.streams: dict[int, HboneStream] = {}
        self.transport: asyncio.Transport | None = None
        # Set with the transport. Kept because on Python 3.11 every
        # asyncio.get_running_loop() is a getpid(2): per stream, that showed.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.write_paused = False
        self.closed = False
        self.goaway = False  # the peer said it takes no new streams
        self.draining = False  # we take and open no new streams; closed once idle
        self.last_active = time.monotonic()
        self.opened_at = self.last_active
        self.peer_identity: SpiffeId | None = None  # verified, set once TLS is up
        self._flush_pending = False
        self.protocol_error: str | None = None
        self._on_request = on_request
        self._on_idle = on_idle
        self._on_closed = on_closed
        self._close_reason: str | None = None
        self._keepalive_settings = keepalive
        self._keepalive: Keepalive | None = None
        self.peer_silent = False  # closed because the peer answered no PING

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        if self._keepalive_settings is not None:
            self._keepalive = Keepalive(
                loop, self._keepalive_settings, ping=self._ping, dead=self._silent
            )
            self._keepalive.start()
        self.flush()  # the preface and our SETTINGS

    def data_received(self, data: Bytes) -> None:
        # `data` may be a view lent by the TLS transport, reused once this
        # returns: the codec, the streams and the TCP sides copy what they keep.
        keepalive = self._keepalive
        if keepalive is not None:
            keepalive.heard = True
        try:
            self.h2.receive(data)
        except ProtocolError as e:
            self.protocol_error = f"HTTP/2 protocol error: {e}"
            self._close_reason = self.protocol_error
            self.h2.goaway(e.code, str(e).encode()[:256])
            self.close()
            return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._keepalive is not None:
            self._keepalive.stop()
        reason = self._close_reason or (f"connection lost: {exc}" if exc else "connection closed")
        for stream in list(self.streams.values()):
            stream._on_connection_lost(reason)
        self.streams.clear()
        if self._on_closed is not None:
            self._on_closed(self, self._close_reason or (str(exc) if exc else None))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream._flush()

    # -- used by streams, the pool and the listeners --------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("HBONE connection used before it was connected")
        return self._loop

    def flush(self) -> None:
        """Send what the codec gathered, two event-loop passes from now.

        The answers to one read, and what several streams wrote meanwhile, go
        out as one TLS record and one syscall instead of one per frame. With
        nothing gathered (most reads and acknowledgements) nothing is scheduled:
        whatever gathers frames later calls this again.
        """
        if not self._flush_pending and self.h2.has_output:
            self._flush_pending = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        # Once more around the loop first: a busy proxy's next pass polls and
        # handles what arrived meanwhile (new connections' CONNECTs, other
        # streams' reads), and their frames join this TLS write. Each write
        # costs the peer's receive path and a wake-up. On new connections this
        # took the outbound proxy from 1.2 TLS writes per connection to 0.7
        # (docs/proxy.md, "Where the time goes"); an idle loop's extra pass
        # costs a poll that returns at once.
        self.loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_pending = False
        pieces = self.h2.pieces_to_send()
        transport = self.transport
        if pieces and transport is not None and not self.closed and not transport.is_closing():
            transport.writelines(pieces)

    def ack(self, stream_id: int, size: int) -> None:
        if not self.closed and self.h2.acknowledge(stream_id, size):
            self.flush()

    def reset_stream(self, stream_id: int, code: int) -> None:
        if not self.closed:
            self.h2.reset_stream(stream_id, code)
            self.flush()

    @property
    def capacity(self) -> int:
        """How many more streams the peer lets us open now."""
        if self.closed or self.goaway or self.draining:
            return 0
        return max(0, self.h2.remote_max_concurrent - self.h2.local_open)

    def open_stream(self, authority: str) -> HboneStream:
        """Send a CONNECT request; await the stream's `response` for the answer."""
        stream_id = self.h2.open_stream(
            [(b":method", b"CONNECT"), (b":authority", authority.encode())]
        )
        stream = HboneStream(self, stream_id)
        self.streams[stream_id] = stream
        self.flush()
        self.last_active = time.monotonic()
        return stream

    def respond(self, stream: HboneStream, status: int) -> None:
        """Answer a CONNECT; anything but 200 also ends the stream."""
        if self.closed:
            return
        if stream.id not in self.h2.streams:
            stream._on_h2_reset(ErrorCode.STREAM_CLOSED)
            return
        end = status != 200
        self.h2.send_headers(stream.id, [(b":status", str(status).encode())], end_stream=end)
        self.flush()
        if end:
            stream._finish(f"refused with HTTP {status}")

    def stream_finished(self, stream: HboneStream) -> None:
        self.streams.pop(stream.id, None)
        self.last_active = time.monotonic()
        if self.streams or self.closed:
            return
        if self.draining or self.goaway:
            self.close("drained")
        elif self._on_idle is not None:
            self._on_idle(self)

    def shutdown(self) -> None:
        """Drain: GOAWAY, open streams go on, closed once the last ends."""
        if self.closed:
            return
        self.draining = True
        if not self.h2.goaway_sent:
            self.h2.goaway()
            self.flush()
        if not self.streams:
            self.close("drained")

    def close(self, reason: str | None = None) -> None:
        if reason is not None and self._close_reason is None:
            self._close_reason = reason
        if self.transport is not None:
            self._write_out()  # a GOAWAY, the last frames of a drain
            self.transport.close()

    def _ping(self) -> None:
        if not self.closed:
            self.h2.ping()
            self.flush()

    def _silent(self, reason: str) -> None:
        # Aborted, not closed: a close waits for unsent data to leave, and
        # towards a dead peer it never would.
        self.peer_silent = True
        self.draining = True  # no new streams in the moment before connection_lost
        if self._close_reason is None:
            self._close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # -- http2.Events ------------------------------------------------------------

    def on_request(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:  # noqa: ARG002
        if self.draining:
            # Streams the peer sent before it could see our GOAWAY.
            self.h2.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
            return
        stream = HboneStream(self, stream_id)
        self.streams[stream_id] = stream
        self.last_active = time.monotonic()
        if self._on_request is not None:
            self._on_request(stream, dict(headers))

    def on_response(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:  # noqa: ARG002
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.response.done():
            stream.response.set_result(dict(headers))

    def on_trailers(self, stream_id: int, headers: HeaderList) -> None:
        """Nothing for a tunnel: its end (on_end) follows."""

    def on_data(self, stream_id: int, data: memoryview) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self.h2.acknowledge(stream_id, len(data))  # a stream we dropped: window back
        else:
            stream._on_h2_data(data)

    def on_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._on_h2_end()

    def on_reset(self, stream_id: int, code: int) -> None:
        if code == ErrorCode.REFUSED_STREAM and self.client_side:
            # The peer takes no new streams here (draining, overloaded): open
            # none; close once the ones it already carries end.
            self.draining = True
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._on_h2_reset(code)

    def on_window(self, stream_id: int) -> None:
        if stream_id == 0:
            for each in list(self.streams.values()):
                each._flush()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._flush()

    def on_goaway(self, last_stream_id: int, code: int) -> None:  # noqa: ARG002
        self.goaway = True
        if not self.streams:
            self.close("peer sent GOAWAY")
