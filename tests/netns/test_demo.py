"""`weir demo` is what a new user runs first: it must work and leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node_agent.localmesh.sweep import PREFIX_ROOT
from node_agent.redirect.ebpf.pins import BPFFS

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

WEIR = Path(sys.executable).with_name("weir")
# What examples/mesh.yaml's policies say, pair by pair.
EXPECTED = {
    ("default/client", "legacy/intruder:8080"): "allowed",
    ("default/client", "default/server:8080"): "allowed",
    ("default/client", "default/db:5432"): "denied",
    ("legacy/intruder", "default/client:8080"): "allowed",
    ("legacy/intruder", "default/server:8080"): "denied",
    ("legacy/intruder", "default/db:5432"): "denied",
    ("default/server", "default/client:8080"): "allowed",
    ("default/server", "legacy/intruder:8080"): "allowed",
    ("default/server", "default/db:5432"): "allowed",
    ("default/db", "default/client:8080"): "allowed",
    ("default/db", "legacy/intruder:8080"): "allowed",
    ("default/db", "default/server:8080"): "denied",
}


def _pinned_ebpf() -> list[str]:
    """Programs and links that pins keep alive, but under roots other tests may be using
    meanwhile: the eBPF tests' (weirtest-*) and those of local meshes whose namespaces exist."""

    def show(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    running = {n.split("-")[0] for n in show("ip", "netns", "list").split() if "-" in n}
    busy = tuple(f"{BPFFS}/{prefix}-" for prefix in ("weirtest", *running))

    def objects(kind: str) -> list[dict[str, Any]]:
        return list(json.loads(show("bpftool", "-j", "-f", kind, "show") or "[]"))

    def pins(obj: dict[str, Any]) -> list[str]:
        return [p for p in obj.get("pinned", []) if not p.startswith(busy)]

    links = {link["prog_id"]: pins(link) for link in objects("link") if pins(link)}
    return sorted(
        f"prog {prog['name']} pinned at {pins(prog)}, linked by {links.get(prog['id'], [])}"
        for prog in objects("prog")
        if pins(prog) or prog["id"] in links
    )


def _host_state() -> dict[str, list[str]]:
    def lines(*argv: str) -> list[str]:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()

    return {
        "our namespaces": [n for n in lines("ip", "netns", "list") if n.startswith(PREFIX_ROOT)],
        "links": lines("ip", "-o", "link"),
        "routes": lines("ip", "route") + lines("ip", "-6", "route"),
        # Counters in chain headers move with host traffic; rules must not.
        "host nat rules": [r for r in lines("iptables-nft-save", "-t", "nat") if r[:1] == "-"],
        "processes": [
            p for p in lines("ps", "-eo", "args") if "weir agent" in p or "weir proxy" in p
        ],
        # An eBPF-mode agent's programs stay attached at the cgroup root after it exits.
        "eBPF programs": _pinned_ebpf(),
    }


@pytest.mark.parametrize("mode", ["iptables", "ebpf"])
def test_mesh_demo_every_pair_as_the_policy_says_over_mtls_only(mode):
    before = _host_state()
    proc = subprocess.run(
        [WEIR, "demo"],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
        env={**os.environ, "WEIR_REDIRECT_MODE": mode},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    seen = {}
    for line in out.splitlines():
        m = re.match(
            r"^(\S+/\S+)\s+(\S+/\S+:\d+)\s+(allowed|denied)\S*(?: \(\S+\))?\s+(\S+)\s+(.*)$", line
        )
        if m:
            seen[(m[1], m[2])] = m[3]
            assert m[4] == "mutual_tls", line
            src_ns, src_name = m[1].split("/")
            assert m[5].startswith(f"spiffe://cluster.local/ns/{src_ns}/sa/{src_name} -> "), line
    assert seen == EXPECTED
    assert re.search(
        r"\d+ TCP packets captured on the underlay; 0 of 12 payloads seen in clear", out
    )
    assert out.rstrip().endswith("demo: OK")
    assert _host_state() == before


def test_capture_demo_shows_capture_and_cleans_up():
    before = _host_state()
    proc = subprocess.run(
        [WEIR, "demo", "--capture-only"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "app -> backend:8080" in out
    assert "app:15001 (proxy)" in out
    assert "app:15006 (proxy)" in out
    assert "NO (want" not in out
    assert out.rstrip().endswith("demo: OK")
    assert _host_state() == before
