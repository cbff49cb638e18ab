"""Every `weir node` command against `weir demo --hold`, run as the demo tells a user to.

The demo prints `node NODE: ip netns exec NETNS weir node status` for each
node once its mesh is up; this test parses those lines and runs each command
through exactly that prefix (with the venv's `weir` first on PATH), checks
its JSON against the schemas in node_cli_schemas.py, its exit code, and what
it says against the demo's own mesh (examples/mesh.yaml). Then it removes one
pod's capture behind the agent's back, and stops the demo with SIGTERM: it
must exit 0 and leave nothing of its own behind. In eBPF mode, the nsenter
commands the demo adds (ip netns exec hides the pins) must see the capture.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from node_agent import netns as netns_mod
from node_agent.localmesh.sweep import sweep
from node_agent.localmesh.wiring import NETNS_DIR
from node_agent.netns import Netns
from node_agent.redirect.ebpf.pins import BPFFS
from tests.netns import node_cli_schemas as schemas

pytestmark = [pytest.mark.netns, pytest.mark.timeout(360)]

WEIR = Path(sys.executable).with_name("weir")
NODE_LINE = re.compile(r"^node (\S+): (ip netns exec (\S+) weir node status)$")
# In eBPF mode, where ip netns exec hides the pins, the demo also prints these.
NSENTER_LINE = re.compile(r"^  (nsenter --net=\S+/(\S+) weir node status --bpf-pin-root \S+)$")
HOLDING = "holding the mesh: "
# The demo's table, its pair traffic and its cleanup each take tens of seconds.
_UP_TIMEOUT_S = 200.0
_STOP_TIMEOUT_S = 90.0
_COMMAND_TIMEOUT_S = 60.0
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
INTRUDER_ID = "spiffe://cluster.local/ns/legacy/sa/intruder"
DB_ID = "spiffe://cluster.local/ns/default/sa/db"


def _read_lines(stream: IO[str], into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


@dataclass
class HeldDemo:
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)
    # node name -> the printed command, split as a shell would
    commands: dict[str, list[str]] = field(default_factory=dict)
    netns: dict[str, str] = field(default_factory=dict)
    # netns name -> the printed nsenter command (eBPF mode only), split likewise
    nsenter: dict[str, list[str]] = field(default_factory=dict)

    def wait_until_held(self) -> None:
        """Read the demo's output until it holds, parsing its node lines on the way."""
        deadline = time.monotonic() + _UP_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "demo not held in time:\n" + "\n".join(self.output)
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, "demo ended before holding:\n" + "\n".join(self.output)
            self.output.append(line)
            if m := NODE_LINE.match(line):
                self.commands[m[1]] = shlex.split(m[2])
                self.netns[m[1]] = m[3]
            if m := NSENTER_LINE.match(line):
                self.nsenter[m[2]] = shlex.split(m[1])
            if line.startswith(HOLDING):
                return

    def rest_of_output(self) -> list[str]:
        """Everything the demo printed after the hold, up to its end (bounded)."""
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        rest = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            rest.append(line)
        return rest

    def weir_node(self, node: str, *args: str) -> tuple[int, str]:
        """`weir node ARGS` through the prefix the demo printed for `node`."""
        printed = self.commands[node]
        assert printed[-3:] == ["weir", "node", "status"], printed
        return self.run([*printed[:-1], *args])

    def nsenter_node(self, node: str, *args: str) -> tuple[int, str]:
        """`weir node ARGS --bpf-pin-root ROOT` as the eBPF-mode hint for `node` says."""
        printed = self.nsenter[self.netns[node]]
        assert printed[-5:-2] == ["weir", "node", "status"], printed
        return self.run([*printed[:-3], *args, *printed[-2:]])

    def run(self, argv: list[str]) -> tuple[int, str]:
        path = f"{WEIR.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
            env={**os.environ, "PATH": path},
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode, proc.stdout

    def json(self, node: str, *args: str, schema: Any, code: int = 0) -> dict[str, Any]:
        rc, out = self.weir_node(node, *args, "-o", "json")
        data: dict[str, Any] = json.loads(out)
        assert schemas.errors(data, schema) == [], out
        assert rc == code, out
        return data


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (the demo's control plane, agents and proxies)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _left_behind(prefix: str, pids: list[int]) -> list[str]:
    """What of this demo's own is still there: netns, links, temp dirs, pins, processes."""
    left = [f"netns {p.name}" for p in NETNS_DIR.glob(f"{prefix}*")]
    left += [f"link {p.name}" for p in Path("/sys/class/net").glob(f"{prefix}*")]
    left += [f"dir {p}" for p in Path(tempfile.gettempdir()).glob(f"{prefix}*")]
    left += [f"pins {p}" for p in Path(BPFFS).glob(f"{prefix}*")]
    return left + [f"process {pid}" for pid in pids if _alive(pid)]


@contextlib.contextmanager
def held_demo(mode: str) -> Iterator[HeldDemo]:
    """`weir demo --hold` in redirect mode `mode`; stopped and swept whatever happens."""
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [WEIR, "demo", "--hold"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "WEIR_REDIRECT_MODE": mode},
        )
        assert process.stdout is not None
        held = HeldDemo(process)
        reader = threading.Thread(
            target=_read_lines, args=(process.stdout, held.lines), daemon=True
        )
        reader.start()
        try:
            yield held
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            reader.join(timeout=10)
            # So a failure here does not leak into later tests.
            for netns in held.netns.values():
                sweep(netns.split("-")[0])
            stderr.seek(0)
            sys.stderr.write(stderr.read())


def _up(demo: HeldDemo) -> tuple[str, list[int]]:
    """The demo's prefix and its processes, once it holds."""
    demo.wait_until_held()
    assert sorted(demo.commands) == ["node-1", "node-2"]
    [prefix] = {netns.split("-")[0] for netns in demo.netns.values()}
    assert demo.netns == {n: f"{prefix}-node-{n}" for n in ("node-1", "node-2")}
    assert demo.output[-1].endswith(f"kill -TERM {demo.process.pid} removes it")
    # The agents, proxies and control plane, to check that none outlives the demo.
    pids = _children(demo.process.pid)
    assert len(pids) == 5, pids
    return prefix, pids


def _sigterm_ends_it_cleanly(demo: HeldDemo, prefix: str, pids: list[int]) -> None:
    """SIGTERM ends the hold as the normal way out: exit 0, nothing left behind."""
    demo.process.send_signal(signal.SIGTERM)
    rest = demo.rest_of_output()
    assert demo.process.wait(timeout=_STOP_TIMEOUT_S) == 0, rest
    assert rest[-3:] == [
        "SIGTERM: removing the mesh",
        rest[-2],
        "demo: OK",
    ], rest
    assert rest[-2].startswith("removed every namespace, link, rule and process")
    assert _left_behind(prefix, pids) == []


def test_every_node_command_against_a_held_demo_then_sigterm_removes_it() -> None:
    with held_demo("iptables") as demo:
        _drive_every_command(demo)


def _drive_every_command(demo: HeldDemo) -> None:
    prefix, pids = _up(demo)
    assert demo.nsenter == {}

    # status and workloads, from each node's running agent and proxy and its kernel.
    pods_by_node = {"node-1": ["default/client", "legacy/intruder"],
                    "node-2": ["default/db", "default/server"]}  # fmt: skip
    ips = {}
    for node, pods in pods_by_node.items():
        status = demo.json(node, "status", schema=schemas.STATUS)
        assert status["node"] == node
        assert status["agent"]["ready"] and status["controlplane"]["connected"]
        assert status["pods"] == {"seen": 2, "captured": 2}
        assert status["proxy"]["ready"] and status["proxy"]["pods_served"] == 2
        assert status["problems"] == []
        workloads = demo.json(node, "workloads", schema=schemas.WORKLOADS)["workloads"]
        assert [w["pod"] for w in workloads] == pods
        assert {(w["capture_in_kernel"], w["served_by_proxy"]) for w in workloads} == {(True, True)}
        ips.update({w["pod"]: w["ips"][0] for w in workloads})

    services = demo.json("node-1", "services", schema=schemas.SERVICES)["services"]
    assert [(s["service"], [e["ips"] for e in s["endpoints"]]) for s in services] == [
        ("default/db", [[ips["default/db"]]]),
        ("default/server", [[ips["default/server"]]]),
    ]
    policies = demo.json("node-2", "policies", schema=schemas.POLICIES)["policies"]
    assert [(p["policy"], p["action"]) for p in policies] == [
        ("default/db-allow-server", "ALLOW"),
        ("default/db-deny-legacy", "DENY"),
        ("default/server-allow-client", "ALLOW"),
    ]
    certs = demo.json("node-2", "certs", schema=schemas.CERTS)["certificates"]
    assert [c["identity"] for c in certs] == [DB_ID, SERVER_ID]

    # pod, with the kernel's capture and the pod's listeners; its netns is the live one.
    client = demo.json("node-1", "pod", "default/client", schema=schemas.POD)
    assert client["capture"]["as_expected"] is True and client["capture"]["diff"] == []
    assert client["listeners"]["missing"] == []
    assert client["certificate"]["identity"] == CLIENT_ID
    intruder_netns = demo.json("node-1", "pod", "legacy/intruder", schema=schemas.POD)["netns"]
    server_netns = demo.json("node-2", "pod", "default/server", schema=schemas.POD)["netns"]

    # connections: one held open from the server to the client, seen from both ends.
    # Nothing accepts on the client's 9090: the kernel's backlog takes the
    # connection, so it stays open as long as the server's end holds it.
    with netns_mod.entered(Netns.validate(client["netns"])):
        backlog = socket.create_server(("0.0.0.0", 9090))
    with backlog:
        with netns_mod.entered(Netns.validate(server_netns)):
            held = socket.create_connection((ips["default/client"], 9090), timeout=5)
        with held:
            held.sendall(b"x" * 100)
            deadline = time.monotonic() + 15
            while True:
                ends = {
                    node: demo.json(node, "connections", schema=schemas.CONNECTIONS)
                    for node in ("node-1", "node-2")
                }
                found = {
                    node: [c for c in end["connections"] if c["bytes_up"] == 100]
                    for node, end in ends.items()
                }
                if all(found.values()):
                    break
                assert time.monotonic() < deadline, ends
                time.sleep(0.3)
    for node, direction in (("node-2", "outbound"), ("node-1", "inbound")):
        [conn] = found[node]
        assert conn["direction"] == direction
        assert (conn["src"]["identity"], conn["dst"]["identity"]) == (SERVER_ID, CLIENT_ID)
        assert conn["security_policy"] == "mutual_tls"

    # trace: the destination's node names the deciding policy, denying and allowing.
    denied = demo.json(
        "node-2", "trace", "legacy/intruder", "default/db:5432", schema=schemas.TRACE, code=1
    )
    assert denied["source"]["identity"] == INTRUDER_ID
    assert [(e["address"], e["allowed"], e["reason"]) for e in denied["endpoints"]] == [
        (f"{ips['default/db']}:5432", False, "deny:default/db-deny-legacy")
    ]
    allowed = demo.json("node-2", "trace", "default/client", "default/server:80",
                        schema=schemas.TRACE)  # fmt: skip
    assert [(e["address"], e["allowed"], e["reason"]) for e in allowed["endpoints"]] == [
        (f"{ips['default/server']}:8080", True, "allow:default/server-allow-client")
    ]
    # On the source's node: its capture, checked in the kernel.
    here = demo.json("node-1", "trace", "legacy/intruder", "default/db:5432", schema=schemas.TRACE)
    assert here["source"]["captured"] is True

    # logs: weir-cni's ADD of each of the node's pods, relayed through the agent.
    for node, pods in pods_by_node.items():
        cni = demo.json(node, "logs", "--component", "cni", schema=schemas.LOGS)["records"]
        added = {r["message"].split(":")[0] for r in cni if ": ADD " in r["message"]}
        assert added == set(pods), cni
        agent = demo.json(node, "logs", "--component", "agent", schema=schemas.LOGS)["records"]
        assert {r["component"] for r in agent} == {"agent"}

    # verify: a local mesh node passes what it can. Its CNI chain is run from
    # memory by the mesh (no conf dir, no /opt/cni/bin), and the other node's
    # proxy runs as UID 1337 on the same machine, so those checks may fail.
    for node in ("node-1", "node-2"):
        rc, out = demo.weir_node(node, "verify", "-o", "json")
        verified = json.loads(out)
        assert schemas.errors(verified, schemas.VERIFY) == [], out
        assert (verified["node"], verified["mode"]) == (node, "iptables-nft")
        failed = {c["name"] for c in verified["checks"] if not c["ok"]}
        assert failed <= {"CNI config", "weir-cni binary", "UID 1337"}, out
        assert rc == (1 if verified["problems"] else 0), out
        for name in ("agent", "proxy", "iptables backend", "WEIR rules in one backend"):
            assert name not in failed, out

    # graph: node-2's traffic as a picture; the demo's allowed pair is an mTLS
    # edge, the intruder's denied attempt on the db a failed one.
    with tempfile.TemporaryDirectory(prefix="weir-graph-") as pictures:
        svg, png = Path(pictures) / "node-2.svg", Path(pictures) / "node-2.png"
        graph = demo.json("node-2", "graph", "--out", str(svg), schema=schemas.GRAPH)
        kinds = {(e["source"], e["destination"]): e["security"] for e in graph["edges"]}
        assert kinds[("default/client", "default/server")] == "mutual_tls", graph
        assert kinds[("legacy/intruder", "default/db")] == "failed", graph
        assert graph["picture"] == str(svg)
        picture = svg.read_text()
        assert "<svg" in picture and "default/server" in picture and "failed/denied" in picture
        demo.json("node-2", "graph", "--out", str(png), schema=schemas.GRAPH)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Capture removed behind the agent's back: the pod says so, with the diff, exit 1.
    subprocess.run(
        ["ip", "netns", "exec", Path(intruder_netns).name, "iptables", "-t", "nat", "-F"],
        check=True, timeout=30,
    )  # fmt: skip
    broken = demo.json("node-1", "pod", "legacy/intruder", schema=schemas.POD, code=1)
    assert broken["agent_status"] == "captured"
    assert broken["capture"]["as_expected"] is False
    assert any("missing jump" in line for line in broken["capture"]["diff"]), broken
    rc, out = demo.weir_node("node-1", "pod", "legacy/intruder")
    assert rc == 1 and "NOT CAPTURED" in out
    status = demo.json("node-1", "status", schema=schemas.STATUS, code=1)
    assert status["pods"] == {"seen": 2, "captured": 1}
    # Bad usage, through the same prefix.
    assert demo.weir_node("node-1", "pod", "no-namespace")[0] == 2

    _sigterm_ends_it_cleanly(demo, prefix, pids)


def test_in_ebpf_mode_the_held_demo_says_how_to_see_the_pins() -> None:
    with held_demo("ebpf") as demo:
        prefix, pids = _up(demo)
        assert sorted(demo.nsenter) == sorted(demo.netns.values())
        for node, pods in (("node-1", ["default/client", "legacy/intruder"]),
                           ("node-2", ["default/db", "default/server"])):  # fmt: skip
            rc, out = demo.nsenter_node(node, "status", "-o", "json")
            status = json.loads(out)
            assert schemas.errors(status, schemas.STATUS) == [], out
            assert (rc, status["redirect"]["mode"], status["pods"]) == (
                0,
                "ebpf",
                {"seen": 2, "captured": 2},
            ), out
            rc, out = demo.nsenter_node(node, "workloads", "-o", "json")
            workloads = json.loads(out)["workloads"]
            assert rc == 0 and [w["pod"] for w in workloads] == pods, out
            assert {w["capture_in_kernel"] for w in workloads} == {True}
            # Under ip netns exec the pins are out of sight, and the answer says why.
            rc, out = demo.weir_node(node, "pod", pods[0])
            assert rc == 1 and "cannot see the eBPF pins" in out, out
        _sigterm_ends_it_cleanly(demo, prefix, pids)
