"""The HTTP/2 DATA path in C (_fastpath.c): any frames, cut anywhere, same outcome as Python's.

Two server-side codecs get the same bytes. In one, streams 1 and 3 have a TCP
side attached (a socketpair), so the C path writes their DATA there; in the
other no stream has one, so everything takes the Python path. Whatever the
input, both must end the same way (the same ProtocolError, or none), deliver
the same bytes to each stream, queue the same frames to send and keep the
same windows. C reads lengths and stream ids off the wire: a wrong bound
there would show as a crash, a hang or a difference here.
"""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st

from node_agent.proxy.http2 import frames
from node_agent.proxy.http2.connection import Connection, ProtocolError
from node_agent.proxy.http2.frames import END_STREAM, PADDED, FrameType
from tests.fuzz.fuzzing import budget, file_timeout
from tests.unit.test_http2_fastpath import Flow, attach, drain, opened

pytestmark = file_timeout()

ATTACHED = (1, 3)
OPEN = (1, 3, 5)

frame_types = st.sampled_from(
    [FrameType.DATA] * 6
    + [FrameType.WINDOW_UPDATE, FrameType.PING, FrameType.RST_STREAM, FrameType.HEADERS, 0x0B]
)


@st.composite
def a_frame(draw: st.DrawFn) -> bytes:
    """One frame, mostly well formed DATA, sometimes not: a length that lies, any flags."""
    frame_type = draw(frame_types)
    stream_id = draw(st.sampled_from([*OPEN, 0, 7, 2**31 - 1]))
    payload = draw(st.binary(max_size=3000))
    flags = draw(st.sampled_from([0, 0, 0, END_STREAM, PADDED, PADDED | END_STREAM, 0xFF]))
    length = len(payload)
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.integers(0, 2**24 - 1))  # the header says otherwise
    return frames.HEADER.pack(length >> 16, length & 0xFFFF, frame_type, flags, stream_id) + (
        payload
    )


def _outcome(conn: Connection, wire: bytes, cuts: list[int]) -> int | None:
    start = 0
    try:
        for cut in [*sorted({min(c, len(wire)) for c in cuts}), len(wire)]:
            conn.receive(wire[start:cut])
            start = cut
    except ProtocolError as e:
        return int(e.code)
    return None


@budget(300)
@given(st.lists(a_frame(), max_size=24), st.lists(st.integers(0, 80_000), max_size=6))
def test_c_and_python_paths_agree_on_any_frames(frame_list: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame_list)
    fast, fast_events = opened(OPEN)
    slow, slow_events = opened(OPEN)
    pairs = {stream_id: socket.socketpair() for stream_id in ATTACHED}
    try:
        for stream_id, (ours, _) in pairs.items():
            ours.setblocking(False)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            attach(fast, stream_id, ours, Flow())
            fast_events.tcp[stream_id] = ours  # what Python delivers goes there too
        fast_result = _outcome(fast, wire, cuts)
        slow_result = _outcome(slow, wire, cuts)
        assert fast_result == slow_result
        for stream_id, (_, theirs) in pairs.items():
            theirs.setblocking(False)
            assert drain(theirs) == bytes(slow_events.data.get(stream_id, b"")), stream_id
        assert fast_events.data == {s: d for s, d in slow_events.data.items() if s not in ATTACHED}
        assert fast_events.events == slow_events.events  # requests, ends, resets, ...
        assert fast.data_to_send() == slow.data_to_send()
        assert sorted(fast.streams) == sorted(slow.streams)
        for stream_id, state in fast.streams.items():
            other = slow.streams[stream_id]
            assert (state.recv_available, state.recv_unacked) == (
                other.recv_available,
                other.recv_unacked,
            )
    finally:
        for ours, theirs in pairs.values():
            ours.close()
            theirs.close()
