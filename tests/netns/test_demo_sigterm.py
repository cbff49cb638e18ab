"""`weir demo` owns its process: a SIGTERM mid-run unwinds it and removes what it made."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from node_agent.localmesh.sweep import sweep
from node_agent.localmesh.wiring import NETNS_DIR

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

WEIR = Path(sys.executable).with_name("weir")


def _ours(prefix: str) -> list[str]:
    found = [p.name for p in NETNS_DIR.glob(f"{prefix}*")]
    return sorted(found + [str(p) for p in Path(tempfile.gettempdir()).glob(f"{prefix}*")])


def test_sigterm_during_the_demo_removes_its_namespaces():
    demo = subprocess.Popen([WEIR, "demo", "--capture-only"], stdout=subprocess.PIPE, text=True)
    prefix = None
    try:
        assert demo.stdout is not None
        # "pod app: netns /var/run/netns/<prefix>-pod-default-app, ..." names the demo's prefix.
        line = next(line for line in demo.stdout if line.startswith("pod app: netns "))
        prefix = Path(line.split()[3].rstrip(",")).name.split("-")[0]
        assert _ours(prefix)
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=30)
        left = _ours(prefix)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if prefix is not None:
            sweep(prefix)  # so a failure here does not leak into later tests
    assert demo.returncode == 128 + signal.SIGTERM
    assert left == []
