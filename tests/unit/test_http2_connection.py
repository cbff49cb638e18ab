"""The proxy's HTTP/2 codec: against h2 (an independent implementation) and against itself.

No sockets: bytes go from one side's `data_to_send` to the other's `receive`,
whole or cut at every byte, as TLS may deliver them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import hpack
import pytest

from node_agent.proxy.http2 import frames
from node_agent.proxy.http2 import hpack as our_hpack
from node_agent.proxy.http2.connection import Connection, HeaderList, ProtocolError
from node_agent.proxy.http2.frames import END_STREAM, ErrorCode, FrameType

AUTHORITY = b"10.244.2.5:8080"
CONNECT: HeaderList = [(b":method", b"CONNECT"), (b":authority", AUTHORITY)]


@dataclass
class Recorder:
    """Events as a list; data joined per stream; acknowledges what it gets unless told not to."""

    conn: Connection | None = None
    events: list[tuple[object, ...]] = field(default_factory=list)
    data: dict[int, bytearray] = field(default_factory=dict)
    ack: bool = True

    def on_request(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        self.events.append(("request", stream_id, headers, end_stream))

    def on_response(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        self.events.append(("response", stream_id, headers, end_stream))

    def on_trailers(self, stream_id: int, headers: HeaderList) -> None:
        self.events.append(("trailers", stream_id, headers))

    def on_data(self, stream_id: int, data: memoryview) -> None:
        self.data.setdefault(stream_id, bytearray()).extend(data)
        if self.ack and self.conn is not None:
            self.conn.acknowledge(stream_id, len(data))

    def on_end(self, stream_id: int) -> None:
        self.events.append(("end", stream_id))

    def on_reset(self, stream_id: int, code: int) -> None:
        self.events.append(("reset", stream_id, code))

    def on_window(self, stream_id: int) -> None:
        self.events.append(("window", stream_id))

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        self.events.append(("goaway", last_stream_id, code))

    def named(self, name: str) -> list[tuple[object, ...]]:
        return [e for e in self.events if e[0] == name]


def ours(
    *,
    client_side: bool,
    window: int = 1 << 20,
    streams: int = 100,
    recorder: Recorder | None = None,
) -> tuple[Connection, Recorder]:
    recorder = recorder or Recorder()
    conn = Connection(
        recorder,
        client_side=client_side,
        stream_window=window,
        connection_window=4 * window,
        max_frame_size=1 << 20,
        max_concurrent_streams=streams,
    )
    recorder.conn = conn
    return conn, recorder


def theirs(*, client_side: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    )
    conn.initiate_connection()
    return conn


def pump(a: Connection, b: Connection, *, cut: int = 0) -> None:
    """Until neither side has anything to send; `cut` delivers in pieces of that many bytes."""
    for _ in range(50):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                moved = True
                step = cut or len(data)
                for start in range(0, len(data), step):
                    dst.receive(data[start : start + step])
        if not moved:
            return
    raise AssertionError("the two sides never went quiet")


def pair(**kwargs: int) -> tuple[Connection, Recorder, Connection, Recorder]:
    client, client_events = ours(client_side=True, **kwargs)
    server, server_events = ours(client_side=False, **kwargs)
    pump(client, server)
    return client, client_events, server, server_events


def h2_events(peer: h2.connection.H2Connection, data: bytes) -> list[h2.events.Event]:
    return list(peer.receive_data(data))


# -- against h2 ---------------------------------------------------------------------------


def test_client_tunnels_through_an_h2_server_both_ways_beyond_the_default_window() -> None:
    client, events = ours(client_side=True)
    server = theirs(client_side=False)
    stream = client.open_stream(CONNECT)
    received = bytearray()
    request = None
    for event in h2_events(server, client.data_to_send()):
        if isinstance(event, h2.events.RequestReceived):
            request = dict(event.headers)
    assert request == dict(CONNECT)
    server.send_headers(stream, [(b":status", b"200")])
    client.receive(server.data_to_send())
    assert events.named("response") == [("response", stream, [(b":status", b"200")], False)]
    # 200 KiB up: more than h2's default 64 KiB stream window, so our sender
    # must wait for h2's WINDOW_UPDATEs and carry on.
    payload = bytes(range(256)) * 800
    sent = 0
    for _ in range(100):
        size = min(client.send_window(stream), len(payload) - sent, 16384)
        if size:
            client.send_data(stream, payload[sent : sent + size])
            sent += size
        for event in h2_events(server, client.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                received += event.data
                server.acknowledge_received_data(event.flow_controlled_length, stream)
        client.receive(server.data_to_send())
        if sent == len(payload):
            break
    client.end_stream(stream)
    ended = [
        e for e in h2_events(server, client.data_to_send()) if isinstance(e, h2.events.StreamEnded)
    ]
    assert bytes(received) == payload and ended
    server.send_data(stream, b"down", end_stream=True)
    client.receive(server.data_to_send())
    assert events.data[stream] == b"down"
    assert events.named("end") == [("end", stream)]
    assert stream not in client.streams  # both sides ended: forgotten


def test_a_grpc_style_answer_ends_in_trailers_and_bad_trailers_reset_the_stream() -> None:
    client, events = ours(client_side=True)
    server = theirs(client_side=False)
    request = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/weir.v1.CertificateAuthority/SignCertificate"),
        (b":authority", b"controlplane:15012"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    first = client.open_stream(request)
    second = client.open_stream(request)
    h2_events(server, client.data_to_send())
    for stream in (first, second):
        server.send_headers(stream, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        server.send_data(stream, b"\0\0\0\0\x02hi")
    server.send_headers(first, [(b"grpc-status", b"0")], end_stream=True)
    client.receive(server.data_to_send())
    assert [e[1] for e in events.named("response")] == [first, second]
    assert events.named("trailers") == [("trailers", first, [(b"grpc-status", b"0")])]
    assert events.named("end") == [("end", first)]
    assert events.data[first] == b"\0\0\0\0\x02hi"

    # Trailers must end the stream: HEADERS after the response without
    # END_STREAM is a malformed message (RFC 9113 8.1), reset, not a new response.
    # (h2 will not send such a frame: it is built here.)
    block = our_hpack.encode([(b"grpc-status", b"0")])  # literals: no table state
    client.receive(frames.headers(second, block, end_stream=False, max_frame_size=16384))
    assert events.named("reset") == [("reset", second, ErrorCode.PROTOCOL_ERROR)]
    assert [e[1] for e in events.named("response")] == [first, second]
    resets = [
        e for e in h2_events(server, client.data_to_send()) if isinstance(e, h2.events.StreamReset)
    ]
    assert [(e.stream_id, e.error_code) for e in resets] == [(second, ErrorCode.PROTOCOL_ERROR)]


def test_server_answers_an_h2_client_and_its_bytes_arrive_cut_anywhere() -> None:
    server, events = ours(client_side=False)
    client = theirs(client_side=True)
    client.send_headers(1, CONNECT)
    client.send_data(1, b"hello through the tunnel", end_stream=True)
    wire = client.data_to_send()
    for byte in range(len(wire)):  # one byte at a time: every frame split everywhere
        server.receive(wire[byte : byte + 1])
    assert events.named("request") == [("request", 1, CONNECT, False)]
    assert events.data[1] == b"hello through the tunnel"
    assert events.named("end") == [("end", 1)]
    server.send_headers(1, [(b":status", b"200")], end_stream=False)
    server.send_data(1, b"back", end_stream=True)
    got = h2_events(client, server.data_to_send())
    assert any(isinstance(e, h2.events.ResponseReceived) for e in got)
    assert [e.data for e in got if isinstance(e, h2.events.DataReceived)] == [b"back"]
    assert 1 not in server.streams


def test_h2_sees_our_ping_answers_settings_acks_and_resets() -> None:
    server, _ = ours(client_side=False)
    client = theirs(client_side=True)
    client.ping(b"12345678")
    client.send_headers(1, CONNECT)
    server.receive(client.data_to_send())
    server.reset_stream(1, ErrorCode.CONNECT_ERROR)
    got = h2_events(client, server.data_to_send())
    kinds = {type(e) for e in got}
    assert h2.events.PingAckReceived in kinds and h2.events.SettingsAcknowledged in kinds
    assert [e.error_code for e in got if isinstance(e, h2.events.StreamReset)] == [
        ErrorCode.CONNECT_ERROR
    ]


def test_our_ping_is_answered_by_h2_and_its_ack_is_taken_quietly() -> None:
    client, events = ours(client_side=True)
    server = theirs(client_side=False)
    h2_events(server, client.data_to_send())  # our preface and SETTINGS
    client.ping(b"keepaliv")
    got = h2_events(server, client.data_to_send())
    assert [e.ping_data for e in got if isinstance(e, h2.events.PingReceived)] == [b"keepaliv"]
    client.receive(server.data_to_send())  # h2's PING ACK (and its SETTINGS)
    assert events.events == []
    assert b"keepaliv" not in client.data_to_send()  # an ACK is not answered
    with pytest.raises(ValueError, match="8 bytes, not 3"):
        client.ping(b"abc")


def test_an_h2_peer_with_huffman_and_the_dynamic_table_is_decoded() -> None:
    server, events = ours(client_side=False)
    client = theirs(client_side=True)
    extra = [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    for stream in (1, 3, 5):  # later requests refer to the first one's table entries
        client.send_headers(stream, CONNECT + extra)
    server.receive(client.data_to_send())
    assert [e[2] for e in events.named("request")] == [CONNECT + extra] * 3


# -- GOAWAY, ours on both sides --------------------------------------------------------


def test_goaway_lets_open_streams_finish_and_refuses_those_the_peer_had_not_seen() -> None:
    client, client_events, server, server_events = pair()
    open_one = client.open_stream(CONNECT)
    pump(client, server)
    server.send_headers(open_one, [(b":status", b"200")], end_stream=False)
    # The server drains; a stream the client opens before the GOAWAY reaches it:
    server.goaway()
    late = client.open_stream(CONNECT)
    pump(client, server)
    assert client_events.named("goaway") == [("goaway", open_one, ErrorCode.NO_ERROR)]
    assert ("reset", late, ErrorCode.REFUSED_STREAM) in client_events.events
    assert [e[1] for e in server_events.named("request")] == [open_one]
    with pytest.raises(ProtocolError, match="after GOAWAY"):
        client.open_stream(CONNECT)
    # The open stream goes on, both ways, to a clean end.
    client.send_data(open_one, b"up", end_stream=True)
    server.send_data(open_one, b"down", end_stream=True)
    pump(client, server)
    assert server_events.data[open_one] == b"up" and client_events.data[open_one] == b"down"
    assert not client.streams and not server.streams


# -- flow control -------------------------------------------------------------------------


def test_window_is_handed_back_in_batches_not_per_frame() -> None:
    client, _, server, _server_events = pair(window=65536)
    stream = client.open_stream(CONNECT)
    pump(client, server)
    for _ in range(3):
        client.send_data(stream, b"x" * 4096)
    server.receive(client.data_to_send())
    assert server.data_to_send() == b""  # 12 KiB taken, under a quarter of the window
    client.send_data(stream, b"x" * 8192)
    server.receive(client.data_to_send())
    # 20 KiB: over a quarter of the stream's window, not of the connection's (256 KiB).
    assert server.data_to_send() == frames.window_update(stream, 20480)


def test_data_beyond_the_stream_window_resets_that_stream_only() -> None:
    client, _, server, server_events = pair(window=16384)
    stream = client.open_stream(CONNECT)
    pump(client, server)
    server_events.ack = False
    raw = frames.frame_header(16385, FrameType.DATA, 0, stream) + b"y" * 16385
    server.receive(raw)
    assert ("reset", stream, ErrorCode.FLOW_CONTROL_ERROR) in server_events.events
    assert stream not in server.streams


def test_whole_data_frames_reach_the_stream_and_end_it_and_data_after_the_end_resets() -> None:
    client, _, server, server_events = pair()
    stream = client.open_stream(CONNECT)
    pump(client, server)
    server.receive(
        frames.frame_header(5, FrameType.DATA, 0, stream)
        + b"first"
        + frames.frame_header(6, FrameType.DATA, END_STREAM, stream)
        + b"second"
    )
    assert server_events.data[stream] == b"firstsecond"
    assert server_events.named("end") == [("end", stream)]
    assert stream in server.streams  # our side of it is still open
    server.receive(frames.frame_header(4, FrameType.DATA, 0, stream) + b"late")
    assert ("reset", stream, ErrorCode.STREAM_CLOSED) in server_events.events
    assert server_events.data[stream] == b"firstsecond"
    assert stream not in server.streams


def test_data_beyond_the_connection_window_is_a_connection_error() -> None:
    client, _, server, server_events = pair(window=16384)  # connection window: 64 KiB
    server_events.ack = False
    streams = [client.open_stream(CONNECT) for _ in range(5)]
    pump(client, server)
    for stream in streams[:4]:  # each within its stream's window; together the connection's
        server.receive(frames.frame_header(16384, FrameType.DATA, 0, stream) + b"z" * 16384)
    assert sum(len(d) for d in server_events.data.values()) == 65536
    with pytest.raises(ProtocolError) as caught:
        server.receive(frames.frame_header(1, FrameType.DATA, 0, streams[4]) + b"z")
    assert caught.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_settings_grow_every_open_streams_send_window() -> None:
    client, client_events, _server, _ = pair(window=1 << 20)
    stream = client.open_stream(CONNECT)
    before = client.send_window(stream)
    client.receive(frames.settings({frames.Setting.INITIAL_WINDOW_SIZE: (1 << 20) + 1000}))
    assert client.send_window(stream) == min(before + 1000, 4 << 20)
    assert ("window", 0) in client_events.events


def test_a_peers_header_table_size_is_answered_by_a_size_update_in_the_next_block() -> None:
    client, _, server, server_events = pair()
    client.receive(frames.settings({frames.Setting.HEADER_TABLE_SIZE: 256}))
    stream = client.open_stream(CONNECT)
    wire = client.data_to_send()
    headers_at = frame_types(wire).index(FrameType.HEADERS)
    offset = sum_frame_sizes(wire, headers_at)
    assert wire[offset + frames.HEADER_SIZE] == 0x20  # dynamic table size update to 0
    server.receive(wire)
    assert server_events.named("request") == [("request", stream, CONNECT, False)]
    second = client.open_stream(CONNECT)  # once only
    wire = client.data_to_send()
    assert wire[frames.HEADER_SIZE] != 0x20
    server.receive(wire)
    assert [e[1] for e in server_events.named("request")] == [stream, second]


# -- what a peer must not send ---------------------------------------------------------


def test_continuation_frames_are_joined_into_one_header_block() -> None:
    server, events = ours(client_side=False)
    client = theirs(client_side=True)
    server.receive(client.data_to_send())
    block = h2_encoder_block([*CONNECT, (b"x-long", b"v" * 300)])
    server.receive(frames.headers(1, block, end_stream=False, max_frame_size=100))
    assert events.named("request") == [("request", 1, [*CONNECT, (b"x-long", b"v" * 300)], False)]


def test_padded_data_and_headers_are_unpadded() -> None:
    server, events = ours(client_side=False)
    server.receive(theirs(client_side=True).data_to_send())
    block = h2_encoder_block(CONNECT)
    padded_block = bytes([3]) + block + b"\0\0\0"
    flags = frames.END_HEADERS | frames.PADDED
    server.receive(
        frames.frame_header(len(padded_block), FrameType.HEADERS, flags, 1) + padded_block
    )
    data = bytes([5]) + b"inner" + b"\0" * 5
    server.receive(frames.frame_header(len(data), FrameType.DATA, frames.PADDED, 1) + data)
    assert events.named("request")[0][2] == CONNECT
    assert events.data[1] == b"inner"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([(b":method", b"CONNECT")], "no authority"),
        ([*CONNECT, (b":path", b"/")], "CONNECT with a path"),
        ([*CONNECT, (b"X-Upper", b"1")], "uppercase name"),
        ([(b"user-agent", b"x"), *CONNECT], "pseudo-header after a regular one"),
        ([*CONNECT, (b":method", b"CONNECT")], "repeated pseudo-header"),
        ([*CONNECT, (b"connection", b"close")], "connection-specific header"),
        ([(b":status", b"200"), *CONNECT], "response pseudo-header in a request"),
    ],
)
def test_malformed_requests_reset_the_stream_not_the_connection(
    headers: HeaderList, why: str
) -> None:
    server, events = ours(client_side=False)
    server.receive(theirs(client_side=True).data_to_send())
    server.data_to_send()
    server.receive(
        frames.headers(1, h2_encoder_block(headers), end_stream=False, max_frame_size=16384)
    )
    assert not events.named("request"), why
    assert frame_types(server.data_to_send()) == [FrameType.RST_STREAM]
    server.receive(
        frames.headers(3, h2_encoder_block(CONNECT), end_stream=False, max_frame_size=16384)
    )
    assert [e[1] for e in events.named("request")] == [3]


def test_streams_over_our_limit_are_refused() -> None:
    client, _, server, server_events = pair(streams=2)
    client.remote_max_concurrent = 10  # a peer that ignores our setting
    for _ in range(3):
        client.open_stream(CONNECT)
    server.receive(client.data_to_send())
    assert [e[1] for e in server_events.named("request")] == [1, 3]
    assert frames.rst_stream(5, ErrorCode.REFUSED_STREAM) in server.data_to_send()
    assert 5 not in server.streams


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, ErrorCode.PROTOCOL_ERROR),
        (frames.PREFACE + frames.ping(b"12345678", ack=False), ErrorCode.PROTOCOL_ERROR),
        (
            frames.PREFACE + frames.frame_header(5, FrameType.SETTINGS, 0, 0) + b"12345",
            ErrorCode.FRAME_SIZE_ERROR,
        ),
        (
            frames.PREFACE + frames.frame_header(2 << 20, FrameType.DATA, 0, 1),
            ErrorCode.FRAME_SIZE_ERROR,
        ),
    ],
    ids=["http1", "ping-first", "settings-size", "frame-too-big"],
)
def test_connection_errors_at_the_start(wire: bytes, code: ErrorCode) -> None:
    server, _ = ours(client_side=False)
    with pytest.raises(ProtocolError) as caught:
        server.receive(wire)
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (frames.frame_header(4, FrameType.DATA, 0, 9) + b"data", ErrorCode.PROTOCOL_ERROR),
        (frames.window_update(0, 0), ErrorCode.PROTOCOL_ERROR),
        (frames.window_update(0, 2**31 - 1), ErrorCode.FLOW_CONTROL_ERROR),
        (frames.rst_stream(7, 0), ErrorCode.PROTOCOL_ERROR),
        (
            frames.frame_header(4, FrameType.PUSH_PROMISE, 4, 1) + b"\0\0\0\2",
            ErrorCode.PROTOCOL_ERROR,
        ),
        (frames.frame_header(3, FrameType.PING, 0, 0) + b"abc", ErrorCode.FRAME_SIZE_ERROR),
        (frames.frame_header(2, FrameType.CONTINUATION, 4, 1) + b"ab", ErrorCode.PROTOCOL_ERROR),
        (frames.settings({frames.Setting.MAX_FRAME_SIZE: 100}), ErrorCode.PROTOCOL_ERROR),
        (
            frames.headers(1, b"\xff\xff\xff\xff\xff\x0f", end_stream=False, max_frame_size=100),
            ErrorCode.COMPRESSION_ERROR,
        ),
    ],
    ids=[
        "data-idle",
        "wu-zero",
        "wu-overflow",
        "rst-idle",
        "push",
        "ping-size",
        "continuation-alone",
        "max-frame",
        "hpack",
    ],
)
def test_connection_errors_later(frame: bytes, code: ErrorCode) -> None:
    client, _, server, _ = pair()
    client.open_stream(CONNECT)
    pump(client, server)
    with pytest.raises(ProtocolError) as caught:
        server.receive(frame)
    assert caught.value.code == code


def test_unknown_frame_types_and_priority_are_ignored() -> None:
    client, _, server, server_events = pair()
    stream = client.open_stream(CONNECT)
    pump(client, server)
    server.receive(frames.frame_header(3, 0xFA, 0, 0) + b"ext")
    server.receive(frames.frame_header(5, FrameType.PRIORITY, 0, stream) + b"\0\0\0\0\x10")
    client.send_data(stream, b"still fine")
    pump(client, server)
    assert server_events.data[stream] == b"still fine"


# -- helpers --------------------------------------------------------------------------------


def h2_encoder_block(headers: HeaderList) -> bytes:
    """A header block from hpack's encoder (Huffman and the dynamic table, as Envoy sends)."""
    return bytes(hpack.Encoder().encode(headers))


def sum_frame_sizes(wire: bytes, count: int) -> int:
    """Where the frame after the first `count` frames starts."""
    pos = 0
    for _ in range(count):
        high, low = frames.HEADER.unpack_from(wire, pos)[:2]
        pos += frames.HEADER_SIZE + (high << 16 | low)
    return pos


def frames_in(wire: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each frame in `wire`."""
    found = []
    pos = 0
    while pos < len(wire):
        high, low, frame_type, flags, stream_id = frames.HEADER.unpack_from(wire, pos)
        end = pos + frames.HEADER_SIZE + (high << 16 | low)
        found.append((frame_type, flags, stream_id, wire[pos + frames.HEADER_SIZE : end]))
        pos = end
    return found


def frame_types(wire: bytes) -> list[int]:
    return [frame_type for frame_type, *_ in frames_in(wire)]


# -- what is sent, in pieces ----------------------------------------------------------------


def test_a_large_payload_is_sent_as_given_and_small_frames_are_joined() -> None:
    client, _, server, server_events = pair()
    stream = client.open_stream(CONNECT)
    pump(client, server)
    big = bytes(range(256)) * 1024  # 256 KiB, under the 1 MiB frames both sides allow
    client.send_data(stream, b"small")
    client.send_data(stream, big)
    client.send_data(stream, b"tail", end_stream=True)

    pieces = client.pieces_to_send()

    # Frames before the payload joined with its header; the payload itself not copied.
    assert len(pieces) == 3 and pieces[1] is big
    assert bytes(pieces[0]).endswith(frames.frame_header(len(big), FrameType.DATA, 0, stream))
    server.receive(b"".join(pieces))
    assert server_events.data[stream] == b"small" + big + b"tail"
    assert client.pieces_to_send() == [] and client.data_to_send() == b""
