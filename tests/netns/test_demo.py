"""`weir demo` is what a new user runs first: it must work and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node_agent.localmesh.topology import PREFIX_ROOT

pytestmark = pytest.mark.netns


def _host_state() -> dict[str, list[str]]:
    def lines(*argv: str) -> list[str]:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()

    return {
        "our namespaces": [n for n in lines("ip", "netns", "list") if n.startswith(PREFIX_ROOT)],
        "links": lines("ip", "-o", "link"),
        "routes": lines("ip", "route") + lines("ip", "-6", "route"),
        # Counters in chain headers move with host traffic; rules must not.
        "host nat rules": [r for r in lines("iptables-nft-save", "-t", "nat") if r[:1] == "-"],
    }


def test_demo_shows_capture_and_cleans_up():
    before = _host_state()
    weir = Path(sys.executable).with_name("weir")
    proc = subprocess.run([weir, "demo"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "app -> backend:8080" in out
    assert "app:15001 (proxy)" in out
    assert "app:15006 (proxy)" in out
    assert "NO (want" not in out
    assert out.rstrip().endswith("demo: OK")
    assert _host_state() == before
