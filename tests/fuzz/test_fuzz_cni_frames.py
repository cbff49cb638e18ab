"""The CNI socket: frames weir-cni sends the agent (and the agent's replies it reads).

Decoders accept a message of the protocol or raise its ProtocolError with a
message; the agent's server answers everything it could read, refusing a
malformed request before its handler ever sees it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from cni_plugin.protocol import (
    ConnectionClosedError,
    PodInfo,
    ProtocolError,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    recv_message,
)
from node_agent.cni_events.handler import AddDecision, Attachment
from node_agent.cni_events.server import CniEventServer
from tests.fuzz.fuzzing import budget, file_timeout, inputs, mutated_json, seeds

pytestmark = file_timeout()

FRAMES = seeds("cni_frames")
PAYLOADS = [frame[4:] for frame in FRAMES]
PAYLOAD_INPUTS = st.one_of(
    inputs(PAYLOADS),
    mutated_json([json.loads(f[4:]) for f in seeds("cni_frames", valid_only=True)]).map(
        lambda doc: json.dumps(doc).encode()
    ),
)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@budget(400)
@given(PAYLOAD_INPUTS)
def test_request_decodes_or_is_refused(payload: bytes) -> None:
    try:
        request = decode_request(payload)
    except ProtocolError as e:
        assert str(e)
        return
    if request.op in ("add", "check"):
        assert request.pod is not None and request.pod.netns and request.pod.container_id
    # What the agent accepted it can state again, and reads back the same.
    assert decode_request(encode_request(request)[4:]) == request


@budget(300)
@given(PAYLOAD_INPUTS)
def test_reply_decodes_or_is_refused(payload: bytes) -> None:
    try:
        reply = decode_reply(payload)
    except ProtocolError as e:
        assert str(e)
        return
    assert decode_reply(encode_reply(reply)[4:]) == reply


@budget(200)
@given(inputs(FRAMES))
def test_frame_is_read_or_refused(stream: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(stream)
        right.shutdown(socket.SHUT_WR)
        try:
            payload = recv_message(left, time.monotonic() + 2.0)
        except (ProtocolError, ConnectionClosedError) as e:
            assert str(e)
            return
    size = struct.unpack(">I", stream[:4])[0]
    assert payload == stream[4 : 4 + size]


class _RecordingHandler:
    def __init__(self) -> None:
        self.seen: list[object] = []

    def on_add(self, pod: PodInfo) -> AddDecision:
        self.seen.append(pod)
        return AddDecision(captured=True)

    def on_del(self, pod: PodInfo) -> None:
        self.seen.append(pod)

    def on_check(self, pod: PodInfo) -> None:
        self.seen.append(pod)

    def on_gc(self, valid: frozenset[Attachment]) -> None:
        self.seen.append(valid)


def _exchange(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        # A server that answered without reading everything resets the connection
        # after its answer (unread data at close), which the plugin never reads past.
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def test_agent_server_answers_or_drops_every_frame(tmp_path: Path) -> None:
    handler = _RecordingHandler()
    path = tmp_path / "cni.sock"
    uids = frozenset({0, os.getuid()})
    with CniEventServer(path, handler, io_timeout_s=1.0, allowed_uids=uids):

        @budget(150)
        @given(st.one_of(PAYLOAD_INPUTS.map(_frame), inputs(FRAMES)))
        def check(data: bytes) -> None:
            handler.seen.clear()
            answer = _exchange(path, data)
            try:
                request = decode_request(recv_message_from(data))
            except (ProtocolError, ConnectionClosedError):
                request = None
            if not answer:
                # Only a sender that hung up before a whole frame gets no answer.
                assert request is None
                return
            reply = decode_reply(answer[4:])
            assert "internal error" not in reply.error, reply.error
            if request is None:
                assert not reply.ok and reply.error and not reply.retryable
                assert handler.seen == []
            else:
                assert reply.ok, reply.error

        check()


def recv_message_from(data: bytes) -> bytes:
    """The payload the server reads from `data`, or the error it meets."""
    left, right = socket.socketpair()
    with left, right:
        right.sendall(data)
        right.shutdown(socket.SHUT_WR)
        return recv_message(left, time.monotonic() + 2.0)
