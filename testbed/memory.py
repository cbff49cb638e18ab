"""Resident memory of a process, for tests that check what is kept or given back."""

from __future__ import annotations

from pathlib import Path


def vm_rss_kib(pid: int | str = "self") -> int:
    """VmRSS of `pid` (this process by default), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"process {pid} has no VmRSS (a kernel thread)")
