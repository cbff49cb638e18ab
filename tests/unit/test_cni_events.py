"""The plugin <-> agent protocol and the agent's socket server."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cni_plugin.agent_client import AgentUnreachableError, ask_agent
from cni_plugin.protocol import (
    MAX_FRAME,
    ConnectionClosedError,
    PodInfo,
    ProtocolError,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    recv_message,
)
from node_agent.cni_events.handler import AddDecision, Attachment
from node_agent.cni_events.server import CniEventServer
from testbed.cni_fakes import RecordingHandler
from weir_common.errors import NodeSetupError

POD = PodInfo("c1", "/var/run/netns/p", "eth0", ("10.0.0.5/24",), "default", "web", "u-1")


def pod_json(op: str = "add", drop: str = "", **fields: object) -> bytes:
    """A request whose pod is POD with `fields` changed and `drop` left out."""
    pod: dict[str, object] = {**POD._asdict(), "ips": list(POD.ips), **fields}
    pod.pop(drop, None)
    return json.dumps({"v": 1, "op": op, "pod": pod}).encode()


def payload(frame: bytes) -> bytes:
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    return frame[4:]


@pytest.fixture
def work():
    """A short directory for sockets (sun_path is 108 bytes), always removed."""
    path = Path(tempfile.mkdtemp(prefix="weircni-"))
    yield path
    shutil.rmtree(path)


# -- protocol ------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        Request("add", POD, plugin_log=("ADD default/web",)),
        Request("del", POD._replace(ips=(), netns="")),
        Request("check", POD),
        Request("gc", attachments=(("c1", "eth0"), ("c2", "net1"))),
        Request("status"),
    ],
)
def test_requests_round_trip(request_):
    assert decode_request(payload(encode_request(request_))) == request_


@pytest.mark.parametrize(
    "reply",
    [
        Reply.success(captured=True),
        Reply.success(captured=False, reason="opted out"),
        Reply.failure("proxy not ready", retryable=True),
    ],
)
def test_replies_round_trip(reply):
    assert decode_reply(payload(encode_reply(reply))) == reply


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"v": 2, "op": "add"}', "protocol version 2 is not supported"),
        (b'{"op": "add"}', "protocol version None"),
        (b'{"v": 1, "op": "frob"}', "unknown op 'frob'"),
        (b'{"v": 1, "op": "add"}', "needs a 'pod' object"),
        (b'{"v": 1, "op": "add", "pod": {"netns": "/x"}}', "'container_id' is missing"),
        (pod_json(container_id=""), "no container_id"),
        (pod_json(ips="10.0.0.1"), "'ips' must be a list"),
        (pod_json(container_id=7), "'container_id' must be"),
        (pod_json(drop="uid"), "'uid' is missing"),
        (pod_json(drop="ips"), "'ips' is missing"),
        (pod_json(netns=""), "add request needs the pod's netns"),
        (b'{"v": 1, "op": "gc"}', "gc request needs 'attachments'"),
        (b'{"v": 1, "op": "gc", "attachments": {}}', "'attachments' must be a list"),
        (b'{"v": 1, "op": "gc", "attachments": [["c1"]]}', r"not \[container_id, ifname\]"),
        (b'{"v": 1, "op": "gc", "attachments": [["", "eth0"]]}', r"not \[container_id"),
        (b'{"v": 1, "op": "status", "attachments": []}', "takes no 'attachments'"),
        (b'{"v": 1, "op": "gc", "attachments": [], "pod": {}}', "takes no 'pod'"),
        (b"[" * 200_000, "not UTF-8 JSON"),
        (b'{"v": 1, "op": "gc", "attachments": ' + b"[" * 200_000, "not UTF-8 JSON"),
        (b'{"v": 1, "op": "status", "plugin_log": [1]}', "plugin_log"),
        (b"\xff", "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
    ],
)
def test_malformed_requests_are_rejected_with_a_reason(body, message):
    with pytest.raises(ProtocolError, match=message):
        decode_request(body)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    body = b'{"v": 1, "op": "status", "future": {"x": 1}}'
    assert decode_request(body) == Request("status")


def test_an_oversized_frame_is_refused_on_both_ends():
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_request(Request("status", plugin_log=("x" * MAX_FRAME,)))
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", MAX_FRAME + 1))
        with pytest.raises(ProtocolError, match="outside"):
            recv_message(b, time.monotonic() + 1)


def test_a_frame_cut_short_is_a_closed_connection_not_nonsense():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", 10) + b"{}")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosedError, match="after 2 of 10 bytes"):
            recv_message(b, time.monotonic() + 1)


def test_an_empty_attachment_list_still_says_gc_explicitly():
    frame = payload(encode_request(Request("gc")))
    assert json.loads(frame)["attachments"] == []
    assert decode_request(frame) == Request("gc")


# -- server ----------------------------------------------------------------------


class SlowHandler(RecordingHandler):
    """Holds every ADD until released, to fill the server's slots."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def on_add(self, pod: PodInfo) -> AddDecision:
        self.entered.release()
        self.release.wait(60)
        return AddDecision(captured=True)


class BrokenHandler(RecordingHandler):
    def on_gc(self, valid: frozenset[Attachment]) -> None:
        raise RuntimeError("bug")


def test_socket_is_root_only_from_the_moment_it_appears(work):
    path = work / "sub" / "cni.sock"
    with CniEventServer(path, RecordingHandler()):
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert sorted(p.name for p in path.parent.iterdir()) == ["cni.sock"]
        # Another user cannot even connect.
        (work / "sub").chmod(0o755)
        proc = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode != 0
        assert "PermissionError" in proc.stderr
    assert not path.exists()


def test_peers_outside_allowed_uids_are_refused(work):
    handler = RecordingHandler()
    with CniEventServer(work / "cni.sock", handler, allowed_uids=frozenset({4242})):
        reply = ask_agent(str(work / "cni.sock"), Request("status"), 5)
    assert reply == Reply.failure("uid 0 may not ask", retryable=False)
    assert handler.events() == []


def test_handler_errors_become_replies_and_the_server_keeps_serving(work):
    with CniEventServer(work / "cni.sock", BrokenHandler()):
        reply = ask_agent(str(work / "cni.sock"), Request("gc"), 5)
        assert reply == Reply.failure(
            "node agent internal error: RuntimeError('bug')", retryable=False
        )
        assert ask_agent(str(work / "cni.sock"), Request("status"), 5) == Reply.success()


def test_garbage_gets_an_answer_and_does_not_hurt_the_server(work):
    path = str(work / "cni.sock")
    with CniEventServer(path, RecordingHandler()):
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(path)
            raw.sendall(struct.pack(">I", 5) + b"hello")
            reply = decode_reply(recv_message(raw, time.monotonic() + 5))
        assert not reply.ok
        assert reply.error.startswith("malformed request: message is not UTF-8 JSON")
        assert ask_agent(path, Request("status"), 5) == Reply.success()


def test_a_malformed_gc_changes_nothing_and_says_why(work):
    path = str(work / "cni.sock")
    handler = RecordingHandler()
    with CniEventServer(path, handler):
        for body in (b'{"v":1,"op":"gc"}', b'{"v":1,"op":"gc","attachments":null}'):
            with socket.socket(socket.AF_UNIX) as raw:
                raw.connect(path)
                raw.sendall(struct.pack(">I", len(body)) + body)
                reply = decode_reply(recv_message(raw, time.monotonic() + 5))
            assert not reply.ok
            assert not reply.retryable
            assert "attachments" in reply.error
    assert handler.events() == []


def test_deeply_nested_json_gets_an_error_reply(work):
    path = str(work / "cni.sock")
    with CniEventServer(path, RecordingHandler()):
        body = b'{"v": 1, "op": "status", "plugin_log": ' + b"[" * 200_000
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(path)
            raw.sendall(struct.pack(">I", len(body)) + body)
            reply = decode_reply(recv_message(raw, time.monotonic() + 5))
        assert not reply.ok
        assert reply.error.startswith("malformed request: message is not UTF-8 JSON")
        assert ask_agent(path, Request("status"), 5) == Reply.success()


@pytest.mark.parametrize("sent", [b"", struct.pack(">I", 40), struct.pack(">I", 40) + b'{"v"'])
def test_an_agent_dying_mid_request_is_unreachable_not_nonsense(work, sent):
    """Whatever part of its reply an agent sent before dying, the plugin may retry."""
    path = str(work / "cni.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def die_after_reading() -> None:
        conn, _ = listener.accept()
        with conn:
            recv_message(conn, time.monotonic() + 5)
            conn.sendall(sent)

    agent = threading.Thread(target=die_after_reading)
    agent.start()
    try:
        with pytest.raises(AgentUnreachableError, match="connection closed after"):
            ask_agent(path, Request("add", POD), 5)
    finally:
        agent.join(timeout=5)
        listener.close()


def test_a_full_server_tells_the_plugin_to_retry(work):
    path = str(work / "cni.sock")
    handler = SlowHandler()
    with CniEventServer(path, handler, max_in_flight=2):
        held = [
            threading.Thread(target=ask_agent, args=(path, Request("add", POD), 60))
            for _ in range(2)
        ]
        for t in held:
            t.start()
        try:
            # Both slots taken (generous bound: a loaded machine starts threads late).
            assert all(handler.entered.acquire(timeout=30) for _ in held)
            reply = ask_agent(path, Request("add", POD), 5)
        finally:
            handler.release.set()
            for t in held:
                t.join(timeout=10)
    assert reply == Reply.failure("node agent is busy", retryable=True)


def test_an_answer_sent_before_the_request_was_read_still_reaches_the_plugin(work):
    # As a full server does: answer at once, close without reading. A request
    # larger than the socket buffer makes the plugin's send fail (EPIPE) before
    # it reads; the answer waiting in its buffer must still be what it reports.
    path = str(work / "cni.sock")
    busy = Reply.failure("node agent is busy", retryable=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()

        def answer_unread() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(encode_reply(busy))

        server = threading.Thread(target=answer_unread)
        server.start()
        large = Request("add", POD, plugin_log=("x" * 1000,) * 900)
        try:
            assert ask_agent(path, large, 10) == busy
        finally:
            server.join(timeout=10)


def test_a_live_server_is_not_taken_over_and_a_stale_socket_is(work):
    path = work / "cni.sock"
    with (
        CniEventServer(path, RecordingHandler()),
        pytest.raises(NodeSetupError, match="already serves"),
    ):
        CniEventServer(path, RecordingHandler()).start()
    # A dead agent's socket file (bound, never unlinked) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with CniEventServer(path, RecordingHandler()):
        assert ask_agent(str(path), Request("status"), 5) == Reply.success()
    path.write_text("not a socket")
    with pytest.raises(NodeSetupError, match="is not a socket"):
        CniEventServer(path, RecordingHandler()).start()


def test_stop_leaves_a_successors_socket_alone(work):
    path = work / "cni.sock"
    first = CniEventServer(path, RecordingHandler())
    first.start()
    path.unlink()  # as if the old agent's socket had been cleared by its successor
    with CniEventServer(path, RecordingHandler()):
        first.stop()
        assert ask_agent(str(path), Request("status"), 5) == Reply.success()


def test_a_stopped_agent_is_unreachable(work):
    path = work / "cni.sock"
    with CniEventServer(path, RecordingHandler()):
        pass
    with pytest.raises(AgentUnreachableError, match="socket does not exist"):
        ask_agent(str(path), Request("status"), 1)
