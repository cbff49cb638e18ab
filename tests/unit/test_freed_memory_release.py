"""Freed heap given back to the kernel (node_agent.libc, used by the proxy after bursts)."""

from __future__ import annotations

from pathlib import Path

from node_agent import libc

CHUNK = 64 * 1024  # under glibc's mmap threshold: these come from the heap
COUNT = 480  # 30 MiB


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_free_heap_left_by_a_burst_goes_back_to_the_kernel() -> None:
    before = libc.heap_free_bytes()
    assert before is not None  # glibc, as the proxy's image has
    # A burst: buffers filled (so their pages are resident), then half of them
    # dropped: what is free sits between what is still used, so the heap's top
    # cannot simply shrink.
    buffers = [bytes([i % 251 + 1]) * CHUNK for i in range(COUNT)]
    kept = buffers[::2]
    del buffers
    free = libc.heap_free_bytes()
    assert free is not None and free - before > COUNT // 2 * CHUNK * 3 // 4

    resident = _rss_kib()
    assert libc.release_free_heap()
    released_kib = resident - _rss_kib()
    # Most of the 15 MiB dropped (each free chunk keeps its headers' page parts).
    assert released_kib > COUNT // 2 * CHUNK // 1024 * 3 // 4, released_kib
    assert all(buffer[0] == buffer[-1] for buffer in kept)  # what was kept is intact
