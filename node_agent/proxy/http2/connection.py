"""One HTTP/2 connection's state, without I/O: bytes in, events out, bytes to send.

What HBONE and the proxy's gRPC client (node_agent.proxy.controlplane) need
and no more: request streams (CONNECT, and the POSTs of gRPC with their
trailers), flow control, SETTINGS, PING, RST_STREAM, GOAWAY. Server push is
refused (ENABLE_PUSH 0) and priorities are ignored, as RFC 9113 allows.

Written for the proxy's hot path:
- DATA payloads are handed on as they arrive, as slices of the received
  bytes, not buffered until the frame is complete or copied per frame;
- events are method calls on one `Events` object, not event objects;
- what is sent is gathered and taken at once (`pieces_to_send`): small frames
  joined, so that one read's answers become one TLS record and one write,
  and a large DATA payload left as the caller gave it, not copied behind
  its frame header (a 9-byte record of its own costs less than copying
  256 KiB).

Received header blocks are checked as RFC 9113 8.2-8.5 asks for the requests
and responses HBONE carries; a malformed one resets its stream
(PROTOCOL_ERROR) and a connection-level fault raises `ProtocolError`, after
which the connection is dead: the caller sends `goaway(e.code)` and closes.
"""

from __future__ import annotations

from typing import Final, Protocol

from node_agent.proxy.http2 import frames, hpack
from node_agent.proxy.http2._fastpath import StreamState, deliver_data
from node_agent.proxy.http2.frames import (
    ACK,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    HEADER,
    HEADER_SIZE,
    LARGEST_FRAME_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PADDED,
    PREFACE,
    PRIORITY_FLAG,
    ErrorCode,
    FrameType,
    Setting,
)
from node_agent.proxy.pieces import LARGE, Bytes, join_small_runs

HeaderList = list[tuple[bytes, bytes]]

# A header block is a few hundred bytes in HBONE; more is a peer wasting our memory.
MAX_HEADER_BLOCK: Final = 64 * 1024
MAX_HEADER_LIST_SIZE: Final = 64 * 1024
_CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO: Final = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))
_RESPONSE_PSEUDO: Final = frozenset((b":status",))


class ProtocolError(Exception):
    """A connection error (RFC 9113 5.4.1): the connection cannot go on."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Events(Protocol):
    """What the connection reports, as it parses. Each may send or reset in turn."""

    def on_request(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        """A peer opened a stream (server side): its request headers, checked."""

    def on_response(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        """The final response on a stream we opened (client side)."""

    def on_trailers(self, stream_id: int, headers: HeaderList) -> None:
        """Trailers after a response's data, on a stream we opened (on_end follows)."""

    def on_data(self, stream_id: int, data: memoryview) -> None:
        """Stream bytes, as they arrive. The receiver calls `acknowledge` once it took them."""

    def on_end(self, stream_id: int) -> None:
        """The peer ended its side of the stream (END_STREAM)."""

    def on_reset(self, stream_id: int, code: int) -> None:
        """The stream is gone: the peer reset it, or a GOAWAY said it will not be served."""

    def on_window(self, stream_id: int) -> None:
        """More send window on one stream, or on all of them (stream 0)."""

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        """The peer takes no new streams; those up to `last_stream_id` go on."""


class Connection:
    """Either side of one HTTP/2 connection.

    `stream_window`, `connection_window` and `max_frame_size` are what we
    advertise; `max_concurrent_streams` is how many streams we let the peer
    open at once.
    """

    def __init__(
        self,
        events: Events,
        *,
        client_side: bool,
        stream_window: int,
        connection_window: int,
        max_frame_size: int,
        max_concurrent_streams: int,
    ) -> None:
        self._events = events
        self.client_side = client_side
        self._stream_window = stream_window
        self._max_inbound_frame = max_frame_size
        self._max_concurrent = max_concurrent_streams
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
        self.streams: dict[int, StreamState] = {}
        self.local_open = 0  # streams we opened that are not closed yet
        self._remote_open = 0
        self._next_stream_id = 1 if client_side else 2
        self._last_peer_stream = 0
        # What the peer told us (until it does, the RFC's defaults).
        self.remote_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.remote_max_concurrent = MAX_STREAM_ID
        self._remote_initial_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        # Received-data accounting: what the peer may still send, and what we
        # took but have not handed back yet (WINDOW_UPDATE in batches).
        self._recv_available = connection_window
        self._recv_unacked = 0
        self._connection_threshold = connection_window // 4
        self._stream_threshold = stream_window // 4
        # The peer changed its decoder's table size: our next block says ours is 0
        # (RFC 7541 4.2; we never index, and 0 is within any limit it set).
        self._table_size_update_due = False
        self.goaway_sent = False
        self.goaway_received: int | None = None  # the peer's last stream id
        self._out: list[Bytes] = []
        self._buffer = bytearray()
        self._preface_pending = not client_side
        self._settings_pending = True  # the peer's first frame must be SETTINGS
        # A DATA frame whose payload is still arriving.
        self._data_stream_id = 0
        self._data_left = 0
        self._data_end = False
        # A header block continued in CONTINUATION frames.
        self._block_stream_id = 0
        self._block_flags = 0
        self._block = bytearray()
        if client_side:
            self._out.append(PREFACE)
        self._out.append(
            frames.settings(
                {
                    Setting.ENABLE_PUSH: 0,
                    Setting.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                    Setting.INITIAL_WINDOW_SIZE: stream_window,
                    Setting.MAX_FRAME_SIZE: max_frame_size,
                    Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                }
            )
        )
        if connection_window > DEFAULT_WINDOW:
            self._out.append(frames.window_update(0, connection_window - DEFAULT_WINDOW))

    # -- sending ------------------------------------------------------------------

    @property
    def has_output(self) -> bool:
        """Whether data_to_send would return anything."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """Everything gathered, in one piece."""
        out = self._out
        data = b"".join(out)
        out.clear()
        return data

    def pieces_to_send(self) -> list[Bytes]:
        """Everything gathered, in order: runs of small frames joined, large payloads as given."""
        pieces = join_small_runs(self._out)
        self._out.clear()
        return pieces

    def open_stream(self, headers: HeaderList, *, end_stream: bool = False) -> int:
        """A new stream of ours with its request headers; its id."""
        if self.goaway_sent or self.goaway_received is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "no new streams after GOAWAY")
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "stream ids exhausted")
        self._next_stream_id += 2
        self.streams[stream_id] = StreamState(
            local=True, send_window=self._remote_initial_window, recv_window=self._stream_window
        )
        self.local_open += 1
        self.send_headers(stream_id, headers, end_stream=end_stream)
        return stream_id

    def send_headers(self, stream_id: int, headers: HeaderList, *, end_stream: bool) -> None:
        stream = self.streams[stream_id]
        block = hpack.encode(headers)
        if self._table_size_update_due:
            self._table_size_update_due = False
            block = hpack.size_update(0) + block
        self._out.append(
            frames.headers(
                stream_id,
                block,
                end_stream=end_stream,
                max_frame_size=self.remote_max_frame_size,
            )
        )
        if end_stream:
            self._local_end(stream_id, stream)

    def send_window(self, stream_id: int) -> int:
        """Bytes stream `stream_id` may send now (0 for a closed stream)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return min(self._send_window, stream.send_window)

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> None:
        """One DATA frame; the caller keeps it within `send_window` and the frame size.

        A large `data` is kept, not copied, until taken: the caller must not
        change it meanwhile.
        """
        stream = self.streams[stream_id]
        self._queue_data(stream, stream_id, data, END_STREAM if end_stream else 0)
        if end_stream:
            self._local_end(stream_id, stream)

    def try_send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> bool:
        """One DATA frame with all of `data` if the windows and the peer's frame size
        let it go now (as send_data keeps it); False, with nothing sent, if not."""
        size = len(data)
        stream = self.streams.get(stream_id)
        if (
            stream is None
            or stream.local_closed
            or size > self.remote_max_frame_size
            or size > stream.send_window
            or size > self._send_window
        ):
            return False
        self._queue_data(stream, stream_id, data, 0)
        return True

    def _queue_data(
        self, stream: StreamState, stream_id: int, data: bytes | bytearray | memoryview, flags: int
    ) -> None:
        size = len(data)
        stream.send_window -= size
        self._send_window -= size
        header = HEADER.pack(size >> 16, size & 0xFFFF, FrameType.DATA, flags, stream_id)
        if size < LARGE:
            # One piece with its header: the TLS layer makes a record per write.
            self._out.append(header + data)
        else:
            self._out += (header, data)

    def end_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        self._out.append(frames.frame_header(0, FrameType.DATA, END_STREAM, stream_id))
        self._local_end(stream_id, stream)

    def reset_stream(self, stream_id: int, code: int) -> None:
        """RST_STREAM, once: a stream already gone is left alone."""
        if stream_id in self.streams:
            self._out.append(frames.rst_stream(stream_id, code))
            self._forget(stream_id)

    def acknowledge(self, stream_id: int, size: int) -> bool:
        """`size` bytes of `stream_id` were taken: the peer may send that much more.

        Window updates go out in batches; True if this queued one (something to send).
        """
        queued = False
        self._recv_unacked += size
        if self._recv_unacked >= self._connection_threshold:
            self._out.append(frames.window_update(0, self._recv_unacked))
            self._recv_available += self._recv_unacked
            self._recv_unacked = 0
            queued = True
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return queued
        stream.recv_unacked += size
        if stream.recv_unacked >= self._stream_threshold:
            self._out.append(frames.window_update(stream_id, stream.recv_unacked))
            stream.recv_available += stream.recv_unacked
            stream.recv_unacked = 0
            queued = True
        return queued

    def goaway(self, code: int = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """No new streams from the peer beyond those already seen; those go on (if NO_ERROR)."""
        self.goaway_sent = True
        self._out.append(frames.goaway(self._last_peer_stream, code, debug))

    def ping(self, opaque: bytes = b"\0" * 8) -> None:
        """A PING for the peer to answer (RFC 9113 6.7); its ACK is just more bytes received."""
        if len(opaque) != 8:
            raise ValueError(f"a PING carries 8 bytes, not {len(opaque)}")
        self._out.append(frames.ping(opaque, ack=False))

    def _local_end(self, stream_id: int, stream: StreamState) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(stream_id)

    def _forget(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.local:
            self.local_open -= 1
        else:
            self._remote_open -= 1

    # -- receiving -------------------------------------------------------------------

    def receive(self, data: Bytes) -> None:
        """Parse what arrived, reporting events as it goes. Raises ProtocolError."""
        if self._buffer:
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        view = memoryview(data)
        end = len(data)
        pos = 0
        if self._preface_pending:
            pos = self._preface(data)
            if pos < 0:
                return
        while pos < end:
            if self._data_left:
                pos = self._data_payload(view, pos, end)
                continue
            if end - pos < HEADER_SIZE:
                break
            high, low, frame_type, flags, stream_id = HEADER.unpack_from(data, pos)
            length = high << 16 | low
            stream_id &= MAX_STREAM_ID
            if (
                length > self._max_inbound_frame
                or (self._settings_pending and frame_type != FrameType.SETTINGS)
                or (self._block_stream_id and frame_type != FrameType.CONTINUATION)
            ):
                raise self._misplaced(length)
            if frame_type == FrameType.DATA and not flags & PADDED:
                pos = self._data(view, pos, length, flags, stream_id)
                continue
            if end - pos - HEADER_SIZE < length:
                break  # the rest of this frame is still on its way
            start = pos + HEADER_SIZE
            pos = start + length
            self._frame(frame_type, flags, stream_id, view[start:pos])
        if pos < end:
            self._buffer += view[pos:end]

    def _data(self, view: memoryview, pos: int, length: int, flags: int, stream_id: int) -> int:
        """An unpadded DATA frame starting at `pos`, and as many after it as C takes:
        where the next frame starts (or, for a partial frame, its payload)."""
        # Frames for streams with a TCP side attached go there from C, a run
        # at a time (_fastpath.c); it stops at the first that needs Python.
        delivered_to, self._recv_available, self._recv_unacked = deliver_data(
            view,
            pos,
            self.streams,
            self._recv_available,
            self._recv_unacked,
            self._connection_threshold,
            self._stream_threshold,
            self._max_inbound_frame,
            self._out,
        )
        if delivered_to != pos:
            return delivered_to
        start = pos + HEADER_SIZE
        # The rest of the usual case (a stream with no TCP side, such as the
        # control plane's gRPC, or the frame that ends a stream): all of the
        # frame is here, for an open stream, within both windows. Anything
        # else takes the long way.
        stream = self.streams.get(stream_id) if len(view) - start >= length > 0 else None
        if (
            stream is not None
            and not stream.remote_closed
            and length <= stream.recv_available
            and length <= self._recv_available
        ):
            self._recv_available -= length
            stream.recv_available -= length
            end = start + length
            self._events.on_data(stream_id, view[start:end])
            if flags & END_STREAM and stream_id in self.streams:
                self._remote_end(stream_id)
            return end
        self._data_start(stream_id, length, flags)
        return start

    def _misplaced(self, length: int) -> ProtocolError:
        """Why a frame cannot come here (receive found that it cannot)."""
        if length > self._max_inbound_frame:
            return ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{length}-byte frame, over our limit")
        if self._settings_pending:
            return ProtocolError(ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
        return ProtocolError(ErrorCode.PROTOCOL_ERROR, "header block interrupted")

    def _preface(self, data: Bytes) -> int:
        """Where frames start after the client preface, or -1 while it is incomplete."""
        if len(data) < len(PREFACE):
            # bytes(): startswith takes no memoryview, and the TLS layer lends one.
            if not PREFACE.startswith(bytes(data)):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface")
            self._buffer += data
            return -1
        if data[: len(PREFACE)] != PREFACE:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface")
        self._preface_pending = False
        return len(PREFACE)

    def _frame(self, frame_type: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if frame_type == FrameType.HEADERS:
            self._headers(flags, stream_id, payload)
        elif frame_type == FrameType.CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif frame_type == FrameType.DATA:
            self._padded_data(flags, stream_id, payload)
        elif frame_type == FrameType.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif frame_type == FrameType.SETTINGS:
            self._settings(flags, stream_id, payload)
        elif frame_type == FrameType.RST_STREAM:
            self._rst_stream(stream_id, payload)
        elif frame_type == FrameType.PING:
            self._ping(flags, stream_id, payload)
        elif frame_type == FrameType.GOAWAY:
            self._goaway(stream_id, payload)
        elif frame_type == FrameType.PRIORITY:
            if stream_id == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(stream_id, ErrorCode.FRAME_SIZE_ERROR)
        elif frame_type == FrameType.PUSH_PROMISE:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        # Any other type is an extension we do not know: ignored (RFC 9113 4.1).

    # -- DATA -----------------------------------------------------------------------

    def _data_start(self, stream_id: int, length: int, flags: int) -> None:
        self._take_connection_window(length)
        stream = self._receiving_stream(stream_id, length)
        if stream is None:
            self._recv_unacked_discarded(length)
            stream_id = 0  # the payload is skipped
        self._data_stream_id = stream_id
        self._data_left = length
        self._data_end = bool(flags & END_STREAM)
        if length == 0:
            self._data_done()

    def _data_payload(self, view: memoryview, pos: int, end: int) -> int:
        take = min(self._data_left, end - pos)
        self._data_left -= take
        stream_id = self._data_stream_id
        if stream_id:
            if stream_id in self.streams:
                self._events.on_data(stream_id, view[pos : pos + take])
            else:  # reset while its data was arriving: the window goes back
                self._recv_unacked_discarded(take)
        if not self._data_left:
            self._data_done()
        return pos + take

    def _data_done(self) -> None:
        stream_id = self._data_stream_id
        self._data_stream_id = 0
        if stream_id and self._data_end and stream_id in self.streams:
            self._remote_end(stream_id)

    def _padded_data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        length = len(payload)
        self._take_connection_window(length)
        data = _unpad(payload)
        stream = self._receiving_stream(stream_id, length)
        if stream is None:
            self._recv_unacked_discarded(length)
            return
        # The padding is never delivered, so it is handed back now.
        self.acknowledge(stream_id, length - len(data))
        if data:
            self._events.on_data(stream_id, data)
        if flags & END_STREAM and stream_id in self.streams:
            self._remote_end(stream_id)

    def _take_connection_window(self, length: int) -> None:
        if length > self._recv_available:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_available -= length

    def _receiving_stream(self, stream_id: int, length: int) -> StreamState | None:
        """The stream DATA of `length` bytes is for, or None if that data is to be dropped."""
        if stream_id == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return None  # closed: frames in flight when it closed are dropped (RFC 9113 5.1)
        if stream.remote_closed:
            self._stream_error(stream_id, ErrorCode.STREAM_CLOSED)
            return None
        if length > stream.recv_available:
            self._stream_error(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
            return None
        stream.recv_available -= length
        return stream

    def _recv_unacked_discarded(self, size: int) -> None:
        """Dropped data still used connection window: hand it back."""
        self.acknowledge(0, size)

    # -- HEADERS ----------------------------------------------------------------------

    def _headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        block = payload
        if flags & PADDED:
            block = _unpad(block)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for priority")
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, block)
            return
        self._block_stream_id = stream_id
        self._block_flags = flags
        self._block[:] = block

    def _continuation(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if not self._block_stream_id or stream_id != self._block_stream_id:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        self._block += payload
        if len(self._block) > MAX_HEADER_BLOCK:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            block = bytes(self._block)
            self._block.clear()
            self._block_stream_id = 0
            self._header_block(stream_id, self._block_flags, memoryview(block))

    def _header_block(self, stream_id: int, flags: int, block: memoryview) -> None:
        try:
            headers = self._decoder.decode(block)
        except hpack.HpackError as e:
            raise ProtocolError(ErrorCode.COMPRESSION_ERROR, f"header block: {e}") from None
        end_stream = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._headers_on_open_stream(stream_id, stream, headers, end_stream)
        elif self.client_side or stream_id % 2 == 0:
            if self._idle(stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"HEADERS opening stream {stream_id}")
            # A stream we already closed: its late frames are dropped.
        elif stream_id <= self._last_peer_stream:
            raise ProtocolError(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {stream_id}")
        else:
            self._new_request(stream_id, headers, end_stream)

    def _new_request(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        self._last_peer_stream = stream_id
        if self.goaway_sent or self._remote_open >= self._max_concurrent:
            self._out.append(frames.rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        if not _well_formed(headers, _REQUEST_PSEUDO, request=True):
            self._out.append(frames.rst_stream(stream_id, ErrorCode.PROTOCOL_ERROR))
            return
        self.streams[stream_id] = StreamState(
            local=False, send_window=self._remote_initial_window, recv_window=self._stream_window
        )
        self._remote_open += 1
        self._events.on_request(stream_id, headers, end_stream)
        if end_stream and stream_id in self.streams:
            self._remote_end(stream_id)

    def _headers_on_open_stream(
        self, stream_id: int, stream: StreamState, headers: HeaderList, end_stream: bool
    ) -> None:
        if stream.remote_closed:
            self._stream_error(stream_id, ErrorCode.STREAM_CLOSED)
            return
        if self.client_side and stream.local and stream.responded:
            # Trailers: only as the last frame, and without pseudo-headers.
            if not end_stream or any(name.startswith(b":") for name, _ in headers):
                self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR)
                return
            self._events.on_trailers(stream_id, headers)
        elif self.client_side and stream.local:
            if not _well_formed(headers, _RESPONSE_PSEUDO, request=False):
                self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR)
                return
            status = headers[0][1] if headers and headers[0][0] == b":status" else b""
            if status.startswith(b"1"):
                if end_stream:
                    self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR)
                return  # informational: the final response follows
            stream.responded = True
            self._events.on_response(stream_id, headers, end_stream)
        elif not end_stream or any(name.startswith(b":") for name, _ in headers):
            # Trailers: only as the last frame, and without pseudo-headers.
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR)
            return
        if end_stream and stream_id in self.streams:
            self._remote_end(stream_id)

    def _remote_end(self, stream_id: int) -> None:
        stream = self.streams[stream_id]
        stream.remote_closed = True
        self._events.on_end(stream_id)
        if stream.local_closed:
            self._forget(stream_id)

    # -- the other frames --------------------------------------------------------------

    def _window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        increment = frames.parse_u32(payload) & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self._events.on_window(0)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
            return
        if increment == 0:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self._events.on_window(stream_id)

    def _settings(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6")
        self._settings_pending = False
        window_grew = False
        for code, value in frames.parse_settings(payload):
            window_grew = self._apply_setting(code, value) or window_grew
        self._out.append(frames.SETTINGS_ACK)
        if window_grew:
            self._events.on_window(0)

    def _apply_setting(self, code: int, value: int) -> bool:
        """Take one of the peer's settings; True if it gave streams more send window."""
        if code == Setting.INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too big")
            delta = value - self._remote_initial_window
            self._remote_initial_window = value
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")
            return delta > 0
        if code == Setting.MAX_FRAME_SIZE:
            if not DEFAULT_MAX_FRAME_SIZE <= value <= LARGEST_FRAME_SIZE:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
            self.remote_max_frame_size = value
        elif code == Setting.MAX_CONCURRENT_STREAMS:
            self.remote_max_concurrent = value
        elif code == Setting.HEADER_TABLE_SIZE:
            self._table_size_update_due = True
        elif code == Setting.ENABLE_PUSH and (value > 1 or (value == 1 and self.client_side)):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
        # (Only a client may say it takes pushes; we never push anyway.)
        # MAX_HEADER_LIST_SIZE needs nothing: ours are a few dozen bytes.
        return False

    def _rst_stream(self, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if stream_id not in self.streams:
            if self._idle(stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on idle stream")
            return
        self._forget(stream_id)
        self._events.on_reset(stream_id, frames.parse_u32(payload))

    def _ping(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING not 8 bytes")
        if not flags & ACK:
            self._out.append(frames.ping(bytes(payload), ack=True))

    def _goaway(self, stream_id: int, payload: memoryview) -> None:
        if stream_id != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        last, code = frames.parse_two_u32(payload)
        last &= MAX_STREAM_ID
        self.goaway_received = last
        # Streams of ours beyond `last` were never seen by the peer: safe to retry.
        for refused in [i for i, s in self.streams.items() if s.local and i > last]:
            self._forget(refused)
            self._events.on_reset(refused, ErrorCode.REFUSED_STREAM)
        self._events.on_goaway(last, code)

    # -- helpers -------------------------------------------------------------------------

    def _idle(self, stream_id: int) -> bool:
        """Never opened by either side yet (RFC 9113 5.1)."""
        if (stream_id % 2 == 1) == self.client_side:
            return stream_id >= self._next_stream_id
        return stream_id > self._last_peer_stream

    def _stream_error(self, stream_id: int, code: ErrorCode) -> None:
        """RST_STREAM for a fault on one stream; the stream's owner hears of it."""
        self._out.append(frames.rst_stream(stream_id, code))
        if stream_id in self.streams:
            self._forget(stream_id)
            self._events.on_reset(stream_id, code)


def _unpad(payload: memoryview) -> memoryview:
    if not payload:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]


def _well_formed(headers: HeaderList, pseudo: frozenset[bytes], *, request: bool) -> bool:
    """RFC 9113 8.2-8.3 for what HBONE carries: lowercase names, pseudo-headers first, once."""
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if name.startswith(b":"):
            if regular or name not in pseudo or name in seen:
                return False
            seen.add(name)
        else:
            regular = True
            if name.lower() != name or name in _CONNECTION_SPECIFIC:
                return False
            if name == b"te" and value != b"trailers":
                return False
    if not request:
        return b":status" in seen
    method = next((v for n, v in headers if n == b":method"), None)
    if method == b"CONNECT" and b":protocol" not in seen:
        # Plain CONNECT (RFC 9113 8.5): an authority, no scheme, no path.
        return b":authority" in seen and not seen & {b":scheme", b":path"}
    return method is not None and b":protocol" not in seen and {b":scheme", b":path"} <= seen
