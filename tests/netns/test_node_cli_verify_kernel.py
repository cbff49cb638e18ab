"""`weir node verify` against real iptables rulesets, in a private netns.

The command runs as an operator runs it (`ip netns exec NS weir node verify`),
with the agent's and the proxy's admin answered by small stand-ins on the
netns's loopback: verify reads the capture mode from the agent, and knows
the proxy as the UID 1337 process holding the proxy's admin listener.
For each backend: Weir's rules only where the agent's mode says passes; the
same rules also in the other backend is the nft/legacy mix-up, and fails.
A process running as UID 1337 that is not the proxy is named by its pid.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from node_agent import netns as netns_mod
from node_agent.localmesh.mesh import weir_command
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend
from tests.netns import node_cli_schemas as schemas

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

AGENT_PORT, PROXY_PORT = 15100, 15119


class _Sections(http.server.BaseHTTPRequestHandler):
    sections: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        name = self.path.partition("section=")[2]
        found = name in self.sections
        body = json.dumps({name: self.sections[name]} if found else {"error": "no"}).encode()
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def _admin(ns: Netns, port: int, sections: dict[str, Any]) -> http.server.HTTPServer:
    handler = type("Handler", (_Sections,), {"sections": sections})
    with netns_mod.entered(ns):  # the listening socket belongs to the netns it was made in
        server = http.server.HTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# The proxy's stand-in: its admin listener, held by a UID 1337 process as the real one is.
PROXY_STANDIN = """
import http.server, json, os, sys
body = json.dumps({"node": {"pid": os.getpid()}}).encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("listening", flush=True)
server.serve_forever()
"""
AS_1337 = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"]


@pytest.fixture
def uid_1337(bare_netns: Netns) -> Iterator[list[subprocess.Popen[str]]]:
    """The proxy's stand-in in the netns and a stranger, both as UID 1337; always killed."""
    name = Path(bare_netns.path).name
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    proxy = subprocess.Popen(
        ["ip", "netns", "exec", name, *AS_1337, sys.executable, "-c", PROXY_STANDIN,
         str(PROXY_PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    stranger = subprocess.Popen([*AS_1337, "sleep", "120"], text=True)
    try:
        assert proxy.stdout is not None
        assert proxy.stdout.readline().strip() == "listening"
        yield [proxy, stranger]
    finally:
        for proc in (proxy, stranger):
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def cni(tmp_path: Path) -> tuple[Path, Path]:
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bins.mkdir()
    (conf / "10-bridge.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"},
                                                                    {"type": "weir-cni"}]})
    )  # fmt: skip
    plugin = bins / "weir-cni"
    plugin.write_text("#!/bin/sh\n")
    plugin.chmod(0o755)
    return conf, bins


def _iptables(ns: Netns, backend: Backend, *args: str) -> None:
    proc = netns_mod.run(ns, [f"iptables-{backend}", *args])
    assert proc.returncode == 0, proc.stderr


def _weir_chain(ns: Netns, backend: Backend) -> None:
    _iptables(ns, backend, "-t", "nat", "-N", "WEIR-OUTBOUND")
    _iptables(ns, backend, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "WEIR-OUTBOUND")


def _verify(ns: Netns, cni: tuple[Path, Path]) -> tuple[int, dict[str, Any]]:
    name = Path(ns.path).name
    proc = subprocess.run(
        ["ip", "netns", "exec", name, *weir_command(), "node", "verify", "-o", "json",
         "--agent-admin", str(AGENT_PORT), "--proxy-admin", str(PROXY_PORT),
         "--cni-conf-dir", str(cni[0]), "--cni-bin-dir", str(cni[1])],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    assert schemas.errors(data, schemas.VERIFY) == [], proc.stdout
    return proc.returncode, data


@pytest.mark.parametrize("backend", list(Backend))
def test_verify_reads_the_live_backends_cni_chain_and_uid_1337(bare_netns, backend, uid_1337, cni):
    proxy, stranger = uid_1337
    agent = _admin(
        bare_netns, AGENT_PORT, {"node": {"node": "n1"}, "capture": {"mode": f"iptables-{backend}"}}
    )
    try:
        _weir_chain(bare_netns, backend)
        rc, data = _verify(bare_netns, cni)
        checks = {c["name"]: c for c in data["checks"]}
        assert data["mode"] == f"iptables-{backend}" and data["node"] == "n1"
        assert checks["agent"]["ok"] and checks["proxy"]["ok"]
        assert checks["iptables backend"] == {
            "name": "iptables backend",
            "ok": True,
            "detail": f"iptables-{backend} (the agent's capture mode)",
        }
        assert checks["WEIR rules in one backend"]["ok"], checks
        assert checks["CNI config"]["ok"] and checks["weir-cni in chain"]["ok"]
        assert checks["weir-cni binary"]["ok"]
        uid = checks["UID 1337"]
        assert not uid["ok"] and rc == 1
        # Started from the host netns, not the one verify runs in.
        assert f"{stranger.pid} (sleep, another netns)" in uid["detail"]
        # `ip netns exec` execs setpriv execs python: the same pid holds the listener.
        assert checks["proxy"]["detail"] == f"pid {proxy.pid}"
        assert f"{proxy.pid} (" not in uid["detail"]
        assert any(p.startswith("UID 1337: ") for p in data["problems"])

        other = Backend.LEGACY if backend == Backend.NFT else Backend.NFT
        _weir_chain(bare_netns, other)
        rc, data = _verify(bare_netns, cni)
        mixup = {c["name"]: c for c in data["checks"]}["WEIR rules in one backend"]
        assert not mixup["ok"] and rc == 1
        assert f"iptables-{other} holds 2 Weir rules" in mixup["detail"]
        assert any(p.startswith("WEIR rules in one backend: ") for p in data["problems"])
    finally:
        agent.shutdown()
        agent.server_close()
