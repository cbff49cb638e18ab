"""weir-cni's C front end (cni_plugin/frontend.c), run as a process with hostile input.

Built here with AddressSanitizer and UndefinedBehaviorSanitizer, it gets mutated
network configs and CNI_* variables on ADD, DEL and VERSION, and mutated
replies from a scripted agent. Every run must end in a bounded time with status
0 or 1 and no sanitizer report, and print a CNI result or error (never the
internal-error code), unless it handed the input to the Python plugin, which
here is a stand-in that only says it was called.

Each run is in a mount namespace of its own whose /run is a scratch
directory, so no path the fuzzer makes up (the default agent socket
/var/run/weir/cni.sock included) reaches a socket of this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzzing import budget, file_timeout, inputs, mutated_json, seeds

pytestmark = [file_timeout(), pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
FALLBACK_MARK = "weir-cni-py stand-in"
CONFIGS = [
    raw for raw in seeds("cni_request", valid_only=True) if b'"cniVersion":"1.1.0"' not in raw
]
REPLIES = [frame for frame in seeds("cni_frames", valid_only=True) if b'"ok"' in frame]
RUN_TIMEOUT_S = 20.0
_SANITIZERS = {
    "ASAN_OPTIONS": "exitcode=86:detect_leaks=0:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:exitcode=87:print_stacktrace=1",
}


class _ScriptedAgent:
    """Answers each connection with `reply` after reading one request frame (or what came)."""

    def __init__(self, path: Path) -> None:
        self.reply = b""
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
                conn.settimeout(5.0)
                try:
                    header = conn.recv(4, socket.MSG_WAITALL)
                    if len(header) == 4:
                        size = struct.unpack(">I", header)[0]
                        conn.recv(min(size, 1 << 20), socket.MSG_WAITALL)
                    conn.sendall(self.reply)
                except OSError:
                    continue

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def frontend() -> Iterator[tuple[Path, _ScriptedAgent]]:
    work = Path(tempfile.mkdtemp(prefix="weirfz-"))
    try:
        binary = work / "bin" / "weir-cni"
        binary.parent.mkdir()
        subprocess.run(
            [
                os.environ.get("CC", "gcc"),
                "-std=c11",
                "-O1",
                "-g",
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-o",
                str(binary),
                str(REPO / "cni_plugin" / "frontend.c"),
            ],
            check=True,
            timeout=120,
        )
        stand_in = binary.parent / "weir-cni-py"
        stand_in.write_text(f"#!/bin/sh\ncat >/dev/null\necho '{FALLBACK_MARK}'\n")
        stand_in.chmod(0o755)
        run_dir = work / "run"
        (run_dir / "weir").mkdir(parents=True)
        agent = _ScriptedAgent(run_dir / "weir" / "cni.sock")
        try:
            yield binary, agent
        finally:
            agent.close()
    finally:
        shutil.rmtree(work)


def _run(binary: Path, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    run_dir = binary.parent.parent / "run"
    # /run (and so /var/run) becomes the scratch directory, for this process only.
    script = 'mount --make-rprivate / && mount --bind "$0" /run && exec "$1"'
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, str(run_dir), str(binary)],
        input=stdin,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **_SANITIZERS, **env},
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def _check(result: subprocess.CompletedProcess[bytes]) -> None:
    err = result.stderr.decode(errors="replace")
    assert "Sanitizer" not in err and "runtime error" not in err, err
    assert result.returncode in (0, 1), (result.returncode, err)
    out = result.stdout.decode(errors="replace")
    if FALLBACK_MARK in out:
        assert out.strip() == FALLBACK_MARK, "the front end wrote before handing over"
        return
    if not out and result.returncode == 0:
        return  # DEL prints nothing
    document: Any = json.loads(out)
    assert isinstance(document, dict)
    if result.returncode == 1:
        assert document["code"] != 999 and document["msg"], document


def _with_socket_timeout(doc: object) -> bytes:
    """A config whose agent timeout is short: a scripted agent answers at once anyway."""
    if isinstance(doc, dict):
        doc = {**doc, "agentTimeoutSeconds": 2}
    return json.dumps(doc).encode()


_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)
ENV = st.fixed_dictionaries(
    {
        "CNI_COMMAND": st.sampled_from(("ADD", "DEL", "VERSION")),
        "CNI_CONTAINERID": st.one_of(st.just("4f1c2d3e4f5a"), _TEXT),
        "CNI_NETNS": st.one_of(st.just("/var/run/netns/cni-1"), _TEXT),
        "CNI_IFNAME": st.one_of(st.just("eth0"), st.just("")),
        "CNI_ARGS": st.one_of(
            st.just("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=0b6f"),
            _TEXT,
        ),
        "CNI_PATH": st.just("/opt/cni/bin"),
    }
)
STDIN = st.one_of(
    inputs(CONFIGS, max_ops=3),
    mutated_json([json.loads(raw) for raw in CONFIGS], max_ops=3).map(_with_socket_timeout),
)


def test_frontend_handles_every_input(frontend: tuple[Path, _ScriptedAgent]) -> None:
    binary, agent = frontend

    @settings(budget(120, deadline=None), suppress_health_check=list(HealthCheck))
    @given(ENV, STDIN, inputs(REPLIES, max_ops=3))
    def check(env: dict[str, str], stdin: bytes, reply: bytes) -> None:
        agent.reply = reply
        _check(_run(binary, env, stdin))

    check()
