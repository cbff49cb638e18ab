"""The access log is written off the event loop, and a stalled reader costs lines, not the loop."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator

import pytest

from node_agent.proxy.access_log_writer import AccessLogWriter
from node_agent.proxy.telemetry import (
    ACCESS_LOG_DROPPED,
    AccessLog,
    ConnectionRecord,
    ProxyMetrics,
    Telemetry,
)

F_SETPIPE_SZ = 1031


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    try:
        yield read_end, write_end
    finally:
        for fd in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(fd)


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)


def returns_within(seconds: float, work: Callable[[], None]) -> bool:
    """Whether `work` finished; a call that blocked for good would hang the test otherwise."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def test_lines_arrive_whole_and_in_order(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = AccessLogWriter(write_end, flush_interval=0.05)
    lines = [f'{{"n":{i}}}' for i in range(2000)]
    for line in lines:
        writer(line)
    writer.close()
    assert read_all(read_end).decode().splitlines() == lines
    assert writer.dropped == 0


def test_a_stalled_reader_costs_lines_not_the_caller(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)  # the reader (a log pipe) never reads
    writer = AccessLogWriter(write_end, flush_interval=0.01, max_pending=100)
    line = "x" * 99
    total = 5000

    def log_all() -> None:
        for _ in range(total):
            writer(line)

    assert returns_within(30, log_all)
    assert writer.dropped > 0
    # The reader catches up: whatever was not dropped arrives, and nothing twice.
    received = b""
    while len(received) // 100 + writer.dropped < total:
        received += os.read(read_end, 1 << 16)
    writer.close()
    received += read_all(read_end)
    assert received == (line + "\n").encode() * (total - writer.dropped)


def test_a_failed_file_drops_lines_and_says_so_once(
    pipe: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    read_end, write_end = pipe
    os.close(read_end)  # EPIPE from now on
    writer = AccessLogWriter(write_end, flush_interval=0.01)
    with caplog.at_level(logging.ERROR):
        writer("first")
        writer.close()
        writer("after close")
    assert writer.dropped == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "Broken pipe" in errors[0].getMessage()


def test_no_thread_until_the_first_line() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        writer = AccessLogWriter(devnull)
        assert "access log writer" not in {t.name for t in threading.enumerate()}
        writer.close()
        writer = AccessLogWriter(devnull)
        writer("line")
        assert "access log writer" in {t.name for t in threading.enumerate()}
        writer.close()
        assert "access log writer" not in {t.name for t in threading.enumerate()}
    finally:
        os.close(devnull)


def test_dropped_lines_are_a_metric(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.close(read_end)
    metrics = ProxyMetrics()
    access_log = AccessLog(fd=write_end)
    Telemetry(metrics, access_log)
    access_log.close()  # from now on every line is dropped
    record = ConnectionRecord(reporter="source", source_addr="", destination_addr="")
    for _ in range(3):
        access_log.record(record, sent=0, received=0, outcome="ok", reason=None)
    assert f"{ACCESS_LOG_DROPPED} 3" in metrics.render()
