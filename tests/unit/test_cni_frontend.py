"""The bundle's C front end (cni_plugin/frontend.c) against `python -m cni_plugin`.

The front end answers VERSION, ADD and DEL itself and hands everything else to
the frozen Python plugin. These tests check that split (the fast paths run with
no Python at all, the rest never without it) and compare the two byte for byte:
the request frames the agent gets, and what the runtime sees for agent replies
and configs of every awkward kind.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from test_cni_plugin import PREV_RESULT, config, run

from node_agent.cni_events.server import CniEventServer
from testbed.cni_fakes import RecordingHandler

REPO = Path(__file__).resolve().parents[2]
PYTHON = [sys.executable, "-m", "cni_plugin"]


@pytest.fixture(scope="module")
def bundle() -> Path:
    subprocess.run(["scripts/build-cni-plugin.sh"], cwd=REPO, check=True, timeout=300)
    return REPO / "build" / "cni-plugin" / "weir-cni"


@pytest.fixture
def work():
    path = Path(tempfile.mkdtemp(prefix="weirfe-"))  # short: a socket path lives here
    yield path
    shutil.rmtree(path)


@pytest.fixture
def agent(work):
    handler = RecordingHandler()
    with CniEventServer(work / "cni.sock", handler):
        yield handler, str(work / "cni.sock")


class ScriptedAgent:
    """Accepts connections on a socket, records each request frame, answers `reply` bytes."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[bytes] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                header = conn.recv(4, socket.MSG_WAITALL)
                (size,) = struct.unpack(">I", header)
                self.requests.append(header + conn.recv(size, socket.MSG_WAITALL))
                conn.sendall(self.reply)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)


def frame(body: object) -> bytes:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return struct.pack(">I", len(payload)) + payload


def outcome(proc: subprocess.CompletedProcess[bytes]) -> tuple[int, object, bytes]:
    stdout = json.loads(proc.stdout) if proc.stdout else None
    return proc.returncode, stdout, proc.stderr


def test_the_fast_paths_run_without_python_and_the_rest_never_does(bundle, agent, work):
    handler, sock = agent
    bare = work / "bare"
    bare.mkdir()
    shutil.copy2(bundle / "weir-cni", bare / "weir-cni")  # the front end without weir-cni-py
    argv = [str(bare / "weir-cni")]

    version = run(argv, "VERSION", {"cniVersion": "0.4.0"})
    add = run(argv, "ADD", config(sock), netns=str(work))
    excluded = run(argv, "ADD", config(sock), netns=str(work), pod=("kube-system", "dns"))
    delete = run(argv, "DEL", config(sock), netns="")

    assert json.loads(version.stdout)["cniVersion"] == "0.4.0"
    for proc in (add, excluded):
        assert (proc.returncode, json.loads(proc.stdout)) == (0, PREV_RESULT), proc.stderr
    assert (delete.returncode, delete.stdout) == (0, b"")
    assert [e.op for e in handler.events()] == ["add", "del"]
    for command, stdin in [
        ("CHECK", config(sock)),
        ("ADD", b"{not json"),
        ("ADD", config(str(work / "absent.sock"))),  # connect fails: Python says why
    ]:
        proc = run(argv, command, stdin, netns=str(work))
        assert proc.returncode == 1
        assert json.loads(proc.stdout)["code"] == 999
        assert f"cannot run {bare / 'weir-cni-py'}" in json.loads(proc.stdout)["msg"]
    assert len(handler.events()) == 2


def test_the_front_end_sends_the_agent_the_frames_python_sends(bundle, work):
    agent = ScriptedAgent(work / "raw.sock", frame({"v": 1, "ok": True, "captured": True}))
    front_end = [str(bundle / "weir-cni")]
    weird_pod = ("ns", 'na"me\\é\x01😀')
    try:
        for command, stdin, pod in [
            ("ADD", config(str(agent.path)), ("default", "web")),
            ("ADD", config(str(agent.path)), weird_pod),
            ("DEL", config(str(agent.path)), ("default", "web")),
            ("DEL", config(str(agent.path), prevResult=None), ("", "")),
        ]:
            for argv in (PYTHON, front_end):
                assert run(argv, command, stdin, netns=str(work), pod=pod).returncode == 0
    finally:
        agent.close()
    assert len(agent.requests) == 8
    for python_frame, front_end_frame in zip(
        agent.requests[::2], agent.requests[1::2], strict=True
    ):
        assert front_end_frame == python_frame


@pytest.mark.parametrize(
    "reply",
    [
        frame({"v": 1, "ok": True, "captured": False, "reason": 'opted out ✓ "quoted"\n'}),
        frame({"v": 1, "ok": True}),
        frame({"v": 1, "ok": False, "error": "netns \U0001f600 gone\t\x7f", "retryable": True}),
        frame({"v": 1, "ok": False, "error": "hostNetwork pod", "retryable": False}),
        frame({"v": 2, "ok": True}),
        frame({"ok": True}),
        frame({"v": 1, "ok": "yes"}),
        frame({"v": 1, "ok": True, "captured": "no"}),
        frame({"v": 1, "ok": False, "error": 3, "retryable": True}),
        frame(b"[1, 2]"),
        struct.pack(">I", 0),
        struct.pack(">I", (1 << 20) + 1),
        struct.pack(">I", 50) + b'{"v": 1',
        b"",
    ],
)
@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_every_agent_reply_gives_what_python_gives(bundle, work, reply, command):
    agent = ScriptedAgent(work / "raw.sock", reply)
    try:
        python, front_end = (
            outcome(run(argv, command, config(str(agent.path)), netns=str(work)))
            for argv in (PYTHON, [str(bundle / "weir-cni")])
        )
    finally:
        agent.close()
    assert len(agent.requests) == 2
    assert front_end == python


def test_a_reply_that_is_not_json_is_nonsense_without_pythons_parser_detail(bundle, work):
    agent = ScriptedAgent(work / "raw.sock", frame(b"{not json"))
    try:
        python, front_end = (
            outcome(run(argv, "ADD", config(str(agent.path)), netns=str(work)))
            for argv in (PYTHON, [str(bundle / "weir-cni")])
        )
    finally:
        agent.close()
    nonsense = "weir node agent answered nonsense: message is not UTF-8 JSON"
    assert front_end[1] == {"cniVersion": "1.0.0", "code": 101, "msg": nonsense}
    assert python[1]["msg"].startswith(f"{nonsense}: Expecting property name")


def test_an_agent_that_hangs_times_out_like_python(bundle, work):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(work / "hang.sock"))
    listener.listen(4)
    try:
        for command in ("ADD", "DEL"):
            conf = config(str(work / "hang.sock"), agentTimeoutSeconds=0.3)
            python, front_end = (
                outcome(run(argv, command, conf, netns=str(work)))
                for argv in (PYTHON, [str(bundle / "weir-cni")])
            )
            assert front_end == python
            assert "no answer within 0.3 s" in python[2].decode()
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("command", "stdin", "env"),
    [
        ("VERSION", b"", {}),
        ("VERSION", b'{"cniVersion": "0.3.1"}', {}),
        ("VERSION", b'{"cniVersion": "9.9.9"}', {}),
        ("VERSION", b'{"cniVersion": 1}', {}),
        ("VERSION", b'{"cniVersion": "0.3.\\u0031"}', {}),
        ("VERSION", b'{"cniVersio\\u006e": "0.4.0"}', {}),
        ("VERSION", b'{"x": NaN, "cniVersion": "0.4.0"}', {}),
        ("VERSION", b"[]", {}),
        ("ADD", {"agentTimeoutSeconds": "HUGE"}, {}),
        ("ADD", {"agentTimeoutSeconds": True}, {}),
        ("ADD", {"agentTimeoutSeconds": 0}, {}),
        ("ADD", {"agentTimeoutSeconds": 120.5}, {}),
        ("ADD", {"agentSocket": ""}, {}),
        ("ADD", {"agentSocket": "/x" * 80}, {}),
        ("ADD", {"excludeNamespaces": ["default"]}, {}),
        ("ADD", {"excludeNamespaces": []}, {}),
        ("ADD", {"excludeNamespaces": [""]}, {}),
        ("ADD", {"agentNamespace": "default"}, {}),
        ("ADD", {"agentNamespace": 7}, {}),
        ("ADD", {"prevResult": None}, {}),
        ("ADD", {"prevResult": {"ips": [{"address": "10.0.0.1"}]}}, {}),
        ("ADD", {"prevResult": {"ips": [{"address": "10.0.0.1/8", "x": "é😀"}], "ä": 1}}, {}),
        ("ADD", {"cniVersion": "0.3.0"}, {}),
        ("ADD", {}, {"CNI_ARGS": "K8S_POD_NAMESPACE=kube-system;;K8S_POD_NAME=a=b;X="}),
        ("ADD", {}, {"CNI_ARGS": "K8S_POD_NAMESPACE=default;=x"}),
        ("ADD", {}, {"CNI_ARGS": "K8S_POD_NAME=only-a-name"}),
        ("ADD", {}, {"CNI_CONTAINERID": "ä" * 20}),
        ("ADD", {}, {"CNI_IFNAME": ""}),
        ("DEL", {}, {"CNI_CONTAINERID": ""}),
        ("DEL", {"prevResult": {"ips": "none"}}, {}),
        ("DEL", {"cniVersion": "2.0.0"}, {}),
        ("DEL", {}, {"CNI_ARGS": "broken"}),
        ("FROB", {}, {}),
    ],
)
def test_odd_input_gives_what_python_gives(bundle, agent, work, command, stdin, env):
    handler, sock = agent
    if isinstance(stdin, dict):
        stdin = json.dumps(config(sock) | stdin, ensure_ascii=False).encode()
    stdin = stdin.replace(b'"HUGE"', b"1e400")  # json.dumps would write Infinity
    python, front_end = (
        outcome(run(argv, command, stdin, netns=str(work), **env))
        for argv in (PYTHON, [str(bundle / "weir-cni")])
    )
    assert front_end == python
    assert [e.op for e in handler.events()][::2] == [e.op for e in handler.events()][1::2]


@pytest.mark.parametrize("reply", [b"", struct.pack(">I", 50), struct.pack(">I", 50) + b'{"v": 1'])
def test_an_agent_dying_mid_reply_is_retryable_in_both_plugins(bundle, work, reply):
    """The agent restarting at any byte of its reply: code 11, so the runtime retries."""
    agent = ScriptedAgent(work / "raw.sock", reply)
    try:
        for argv in (PYTHON, [str(bundle / "weir-cni")]):
            code, stdout, _ = outcome(run(argv, "ADD", config(str(agent.path)), netns=str(work)))
            assert code == 1
            assert isinstance(stdout, dict)
            assert stdout["code"] == 11, stdout
            assert "connection closed after" in stdout["msg"]
    finally:
        agent.close()
