"""The access log's lines reach their file from a thread of their own, in batches.

Written from the event loop, one write(2) per connection, a slow reader of
stdout (a container runtime's log pipe that fills up) would block the loop,
and with it every connection the node proxy carries. Here the loop only
appends the line to a queue; a thread gathers what arrives over
`flush_interval` and writes it at once (as Envoy's file access log flushes
once a second). What the thread cannot write fast enough waits in the queue
up to `max_pending` lines; beyond that, and after the file fails, lines are
dropped and counted (weir_proxy_access_log_dropped_total), never waited for.

Each write(2) is whole lines of at most PIPE_BUF bytes (a line longer than
that goes alone): the proxy's worker processes share stdout, and a pipe
keeps writes of up to PIPE_BUF whole, so their lines never interleave.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
from typing import Final

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS: Final = 0.2
MAX_PENDING_LINES: Final = 50_000  # about 25 MB of lines
# How long a write may wait for a non-blocking file to take more, per try.
WRITABLE_WAIT_SECONDS: Final = 1.0


class AccessLogWriter:
    """Lines to `fd` (stdout by default), written off the event loop.

    Call it from one thread (the event loop's); `close` writes what is left.
    The thread starts with the first line, so a process that drops
    privileges before starting threads can create this first.
    """

    def __init__(
        self,
        fd: int = 1,
        *,
        flush_interval: float = FLUSH_INTERVAL_SECONDS,
        max_pending: int = MAX_PENDING_LINES,
    ) -> None:
        self._fd = fd
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        # deque's append and popleft are atomic: the one lock is the Event's.
        self._lines: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()  # set by close(): write what is queued, take no more
        self._closed = False  # the same, for the caller's thread: a bool costs no call
        self._failed = False
        self._writer_thread: threading.Thread | None = None
        self._dropped_here = 0  # by the caller's thread
        self._lost_in_writes = 0  # by the writer thread

    @property
    def dropped(self) -> int:
        """Lines not written: the queue was full, or the file failed."""
        return self._dropped_here + self._lost_in_writes

    def __call__(self, line: str) -> None:
        if self._failed or self._closed or len(self._lines) >= self._max_pending:
            self._dropped_here += 1
            return
        self._lines.append(line)
        if not self._wake.is_set():
            if self._writer_thread is None:
                self._writer_thread = threading.Thread(
                    target=self._run, name="access log writer", daemon=True
                )
                self._writer_thread.start()
            self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting up to `timeout` seconds), then stop."""
        self._closed = True
        self._stop.set()
        if self._writer_thread is None:
            return
        self._wake.set()
        self._writer_thread.join(timeout)
        if self._writer_thread.is_alive():
            log.warning("access log: %d lines not written at exit", len(self._lines))

    def _run(self) -> None:
        lines = self._lines
        while True:
            self._wake.wait()
            # Gather: under load a batch holds hundreds of lines for one write.
            self._stop.wait(self._flush_interval)
            self._wake.clear()  # before draining: a line appended later wakes us again
            batch = []
            while lines:
                batch.append(lines.popleft())
            if batch and not self._failed:
                self._write(batch)
            elif batch:
                self._lost_in_writes += len(batch)
            if self._stop.is_set() and not lines:
                return

    def _write(self, batch: list[str]) -> None:
        try:
            for chunk in whole_line_chunks(batch, select.PIPE_BUF):
                # An offset, not `view = view[n:]`: compiled by mypyc, that wrote
                # some chunks twice (tests/unit/test_access_log_writer.py).
                view, written = memoryview(chunk), 0
                while written < len(chunk):
                    try:
                        written += os.write(self._fd, view[written:])
                    except BlockingIOError:
                        select.select([], [self._fd], [], WRITABLE_WAIT_SECONDS)
        except OSError as e:
            self._failed = True
            self._lost_in_writes += len(batch)
            log.error(
                "access log: cannot write to fd %d (%s); lines are dropped from now on",
                self._fd,
                e.strerror or e,
            )


def whole_line_chunks(lines: list[str], limit: int) -> list[bytes]:
    """`lines` (none holding a newline), newline-terminated, packed into chunks of at
    most `limit` bytes, never splitting a line (one longer than `limit` is a chunk of
    its own). Encoded at once: per line, the encoding cost the writer as much again."""
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    chunks: list[bytes] = []
    start, end = 0, len(data)
    while end - start > limit:
        cut = data.rfind(b"\n", start, start + limit)
        if cut < 0:
            cut = data.find(b"\n", start + limit)
        chunks.append(data[start : cut + 1])
        start = cut + 1
    if start < end:
        chunks.append(data[start:])
    return chunks
