"""The benchmark's C harness (bench/native weir_echo, weir_load) on a private loopback.

Each test runs inside a fresh network namespace of its own (only `lo`, up),
deleted afterwards whatever happened; nothing touches the host's namespace.
Every run is short (under 2 s) and bounded by weir_load's own deadline and a
subprocess timeout on top.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent import netns as netns_mod
from node_agent.netns import Netns
from testbed import native

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

HOST = "127.0.0.1"
PORT = 9000
MIB = 1 << 20


@pytest.fixture(scope="module")
def binaries() -> dict[str, Path]:
    return {name: native.build(name) for name in ("weir_echo", "weir_load")}


@pytest.fixture
def ns(loopback_netns: Netns) -> Netns:
    return loopback_netns


@contextlib.contextmanager
def echo_server(ns: Netns, binary: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """weir_echo on HOST:PORT in `ns`, once it said "ready"; stopped with SIGTERM after."""
    with netns_mod.entered(ns):
        proc = subprocess.Popen(
            [str(binary), "--addr", HOST, "--port", str(PORT), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            assert selector.select(10), "weir_echo said nothing within 10 s"
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.terminate()
        try:
            status = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise
    assert status == 0, "weir_echo exits cleanly on SIGTERM"


def load(ns: Netns, binary: Path, *argv: str) -> tuple[int, dict[str, float], float]:
    """weir_load's exit status, its JSON report's figures and how long it ran (wall seconds)."""
    started = time.monotonic()
    with netns_mod.entered(ns):
        proc = subprocess.run(
            [str(binary), *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    elapsed = time.monotonic() - started
    assert proc.returncode in (0, 2), proc.stderr
    report = json.loads(proc.stdout)
    assert report.pop("mode") == argv[0]
    assert all(isinstance(v, int | float) for v in report.values())
    return proc.returncode, report, elapsed


def target(*extra: str) -> tuple[str, ...]:
    return ("--host", HOST, "--port", str(PORT), *extra)


def test_bulk_gets_every_byte_back(ns: Netns, binaries: dict[str, Path]) -> None:
    with echo_server(ns, binaries["weir_echo"]):
        status, report, _ = load(ns, binaries["weir_load"], "bulk", *target("--mib", "64"))
    assert status == 0
    assert report["failures"] == 0
    assert report["ops"] == 1
    assert report["bytes_sent"] == report["bytes_received"] == 64 * MIB
    assert report["gbps"] > 0


def test_rr_at_saturation(ns: Netns, binaries: dict[str, Path]) -> None:
    with echo_server(ns, binaries["weir_echo"]):
        status, report, _ = load(
            ns, binaries["weir_load"], "rr", *target("--seconds", "1", "--conns", "8")
        )
    assert status == 0
    assert report["failures"] == 0
    assert report["connected"] == 8
    ops = report["ops"]
    assert ops > 100
    assert report["samples"] == ops
    latencies = [report[k] for k in ("p50_us", "p90_us", "p99_us", "max_us")]
    assert 0 < latencies[0] <= latencies[1] <= latencies[2] <= latencies[3]
    assert report["per_s"] == pytest.approx(ops / 1.0, rel=0.05)


def test_rr_over_threads_with_large_requests(ns: Netns, binaries: dict[str, Path]) -> None:
    """Requests bigger than a socket buffer: each is written and read back in many pieces."""
    with echo_server(ns, binaries["weir_echo"], "--threads", "2"):
        status, report, _ = load(
            ns,
            binaries["weir_load"],
            "rr",
            *target("--seconds", "1", "--conns", "4", "--threads", "2", "--size", "300000"),
        )
    assert status == 0
    assert report["failures"] == 0
    ops = report["ops"]
    assert ops > 10
    assert report["bytes_received"] >= ops * 300000


def test_rate_is_held_open_loop(ns: Netns, binaries: dict[str, Path]) -> None:
    with echo_server(ns, binaries["weir_echo"]):
        status, report, _ = load(
            ns,
            binaries["weir_load"],
            "rate",
            *target("--seconds", "1.5", "--rate", "1000", "--conns", "8"),
        )
    assert status == 0
    assert report["failures"] == 0
    assert report["sent"] == report["answered"] == report["samples"] == 1500
    assert report["per_s"] == pytest.approx(1000, rel=0.10)
    assert report["ops"] == pytest.approx(1500, rel=0.10)
    assert report["target_rate"] == 1000


def test_crr_makes_new_connections(ns: Netns, binaries: dict[str, Path]) -> None:
    with echo_server(ns, binaries["weir_echo"]):
        status, report, _ = load(
            ns, binaries["weir_load"], "crr", *target("--seconds", "1", "--conns", "8")
        )
    assert status == 0
    assert report["failures"] == 0
    ops = report["ops"]
    assert ops > 50
    assert report["connected"] >= ops
    assert report["p99_us"] > 0


def test_echo_answers_a_half_close_with_the_whole_echo(
    ns: Netns, binaries: dict[str, Path]
) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the echo's buffer
    with echo_server(ns, binaries["weir_echo"], "--buffer", "65536"):
        with netns_mod.entered(ns):
            client = socket.create_connection((HOST, PORT), timeout=5)
        with client:
            received = bytearray()
            sent = 0
            client.setblocking(False)
            deadline = time.monotonic() + 10
            eof = False
            with selectors.DefaultSelector() as selector:
                selector.register(client, selectors.EVENT_READ | selectors.EVENT_WRITE)
                while not eof and time.monotonic() < deadline:
                    for _, events in selector.select(0.5):
                        if events & selectors.EVENT_WRITE and sent < len(payload):
                            sent += client.send(payload[sent : sent + 65536])
                            if sent == len(payload):
                                client.shutdown(socket.SHUT_WR)
                                selector.modify(client, selectors.EVENT_READ)
                        if events & selectors.EVENT_READ:
                            chunk = client.recv(65536)
                            eof = not chunk
                            received += chunk
    assert eof, "the echo closed its side after the client's half-close"
    assert bytes(received) == payload, "the echo ends with EOF only after the whole payload"


@pytest.mark.parametrize("mode", ["bulk", "rr", "rate", "crr"])
def test_nothing_listening_is_reported_as_failures(
    ns: Netns, binaries: dict[str, Path], mode: str
) -> None:
    extra = ("--rate", "1000") if mode == "rate" else ()
    status, report, elapsed = load(
        ns, binaries["weir_load"], mode, *target("--seconds", "1", *extra)
    )
    assert status == 2
    assert report["ops"] == 0
    assert report["failures"] > 0
    assert report["failures"] == report["connect_failures"]
    assert elapsed < 3


def test_a_peer_that_never_reads_ends_at_the_deadline(ns: Netns, binaries: dict[str, Path]) -> None:
    """Accepted by the kernel, never read: bulk stalls on a full window and must still end."""
    with netns_mod.entered(ns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.bind((HOST, PORT))
        listener.listen(8)
        status, report, elapsed = load(
            ns, binaries["weir_load"], "bulk", *target("--mib", "512", "--deadline", "1")
        )
    assert status == 2
    assert report["ops"] == 0
    assert report["timeouts"] == 1
    assert 0 < report["bytes_sent"] < 512 * MIB
    assert elapsed < 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rr", "--port", "1"], "--host and --port are required"),
        (["rr", "--host", HOST, "--port", "70000"], "--port must be"),
        (["rate", "--host", HOST, "--port", "1"], "rate mode needs --rate"),
        (["rr", "--host", HOST, "--port", "1", "--rate", "5"], "--rate is for rate mode"),
        (["warp", "--host", HOST, "--port", "1"], "the mode is one of"),
        (["rr", "--host", "example.com", "--port", "1"], "IPv4 or IPv6 address"),
    ],
)
def test_bad_options_are_refused(binaries: dict[str, Path], argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [str(binaries["weir_load"]), *argv], capture_output=True, text=True, timeout=10, check=False
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert message in proc.stderr
