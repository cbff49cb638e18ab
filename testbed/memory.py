"""Resident memory of a process, for tests that check what is kept or given back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def vm_rss_kib(pid: int | str = "self") -> int:
    """VmRSS of `pid` (this process by default), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"process {pid} has no VmRSS (a kernel thread)")


def in_fresh_interpreter(code: str, *, timeout: float = 60.0) -> str:
    """What `code` prints, run by a new Python with this checkout on its path: a process
    whose modules and heap are what `code` made them, not what earlier tests left."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=_REPO,
        env={**os.environ, "PYTHONPATH": str(_REPO)},
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    ).stdout
