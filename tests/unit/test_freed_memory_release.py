"""Freed heap given back to the kernel (node_agent.libc, used by the proxy after bursts)."""

from __future__ import annotations

import json

from testbed.memory import in_fresh_interpreter

CHUNK = 64 * 1024  # under glibc's mmap threshold: these come from the heap
COUNT = 480  # 30 MiB

# In a fresh interpreter, as a proxy is: this one's heap holds whatever the
# tests before left free, which the burst would just reuse.
BURST = f"""
import json
from node_agent import libc
from testbed.memory import vm_rss_kib

before = libc.heap_free_bytes()
# A burst: buffers filled (so their pages are resident), then half of them
# dropped: what is free sits between what is still used, so the heap's top
# cannot simply shrink.
buffers = [bytes([i % 251 + 1]) * {CHUNK} for i in range({COUNT})]
kept = buffers[::2]
del buffers
free = libc.heap_free_bytes()
resident = vm_rss_kib()
released = libc.release_free_heap()
print(json.dumps({{
    "freed": free - before,
    "released": released,
    "released_kib": resident - vm_rss_kib(),
    "kept_intact": all(b[0] == b[-1] == (i * 2) % 251 + 1 for i, b in enumerate(kept)),
}}))
"""


def test_free_heap_left_by_a_burst_goes_back_to_the_kernel() -> None:
    result = json.loads(in_fresh_interpreter(BURST))
    dropped = COUNT // 2 * CHUNK
    assert result["freed"] > dropped * 3 // 4
    assert result["released"]
    # Most of the 15 MiB dropped (each free chunk keeps its headers' page).
    assert result["released_kib"] > dropped // 1024 * 3 // 4, result
    assert result["kept_intact"]


# Buffers of the size a proxy reads into, made and dropped: the last ones
# allocated sit at the heap's top, the case glibc trims at once by default.
CHURN = """
import json
from node_agent import libc

kept = libc.keep_freed_heap(trim_above=64 << 20, mmap_from=4 << 20) if {tune} else None
before = libc.heap_free_bytes()
buffers = [bytearray(1 << 20) for _ in range(8)]
del buffers
print(json.dumps({{"kept": kept, "freed": libc.heap_free_bytes() - before}}))
"""


def test_freed_buffers_stay_in_the_heap_until_released() -> None:
    tuned = json.loads(in_fresh_interpreter(CHURN.format(tune=True)))
    assert tuned["kept"] is True
    assert tuned["freed"] > 7 << 20, tuned  # no brk(2) back, no mmap(2) of their own

    # glibc's defaults, for contrast: the same churn leaves (almost) nothing in the heap.
    default = json.loads(in_fresh_interpreter(CHURN.format(tune=False)))
    assert default["freed"] < 2 << 20, default
