"""`weir node ...` against a running local mesh: real control plane, agents and proxies.

The mesh is examples/mesh.yaml (client and legacy/intruder on node-1, server
and db on node-2). Every command runs as a subprocess in node-1's or node-2's
netns, as an operator runs it on the node; its JSON is checked against the
schemas in node_cli_schemas.py and its content against what the test itself
set up (pods, a live connection, capture flushed behind the agent's back).
The admin listeners are shown unreachable from off the node, a /logging
change is shown in force in the running proxy, and /quitquitquit stops it.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_agent import netns as netns_mod
from node_agent.constants import ADMIN_PORT, PROXY_ADMIN_PORT
from node_agent.localmesh.mesh import LocalMesh, real_proxy, weir_command
from node_agent.localmesh.topology import Pod
from node_agent.netns import Netns
from tests.netns import node_cli_schemas as schemas

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

MESH_YAML = Path(__file__).resolve().parents[2] / "examples" / "mesh.yaml"
SERVER_VIP = "10.96.0.10"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
INTRUDER_ID = "spiffe://cluster.local/ns/legacy/sa/intruder"


class Mesh:
    def __init__(self, local: LocalMesh, pods: dict[str, Pod]) -> None:
        self.local = local
        self.pods = pods

    def weir_node(self, node: str, *args: str) -> tuple[int, str]:
        """`weir node ARGS` in the node's netns, as on the node: exit code and stdout."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.local.nodes[node].node.netns_name,
             *weir_command(), "node", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode, proc.stdout

    def json(self, node: str, *args: str, schema: Any, code: int = 0) -> dict[str, Any]:
        rc, out = self.weir_node(node, *args, "-o", "json")
        data: dict[str, Any] = json.loads(out)
        assert schemas.errors(data, schema) == [], out
        assert rc == code, out
        return data


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with LocalMesh(MESH_YAML, real_proxy) as local:
        local.add_node("node-1", "10.244.1.0/24")
        local.add_node("node-2", "10.244.2.0/24")
        pods = {
            "client": local.add_pod("node-1", "client"),
            "intruder": local.add_pod("node-1", "intruder", "legacy"),
            "server": local.add_pod("node-2", "server"),
            "db": local.add_pod("node-2", "db"),
        }
        yield Mesh(local, pods)


def admin_request(ns: Netns, method: str, port: int, path: str) -> tuple[int, Any]:
    with netns_mod.entered(ns):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.connect()
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_status_workloads_and_certs_answer_from_the_running_node(mesh):
    status = mesh.json("node-1", "status", schema=schemas.STATUS)
    assert status["node"] == "node-1"
    assert status["agent"]["ready"] and status["controlplane"]["connected"]
    assert status["pods"] == {"seen": 2, "captured": 2}
    assert status["proxy"]["ready"] and status["proxy"]["pods_served"] == 2
    assert status["certificates"]["count"] == 2
    assert status["problems"] == []

    workloads = mesh.json("node-1", "workloads", schema=schemas.WORKLOADS)
    by_pod = {w["pod"]: w for w in workloads["workloads"]}
    assert sorted(by_pod) == ["default/client", "legacy/intruder"]
    client = mesh.pods["client"]
    assert by_pod["default/client"]["ips"] == [str(client.ipv4)]
    assert by_pod["default/client"]["identity"] == CLIENT_ID
    assert {
        (w["status"], w["capture_in_kernel"], w["served_by_proxy"]) for w in by_pod.values()
    } == {("captured", True, True)}
    # YAML is the same answer.
    rc, out = mesh.weir_node("node-1", "workloads", "-o", "yaml")
    assert (rc, yaml.safe_load(out)) == (0, workloads)
    rc, out = mesh.weir_node("node-1", "workloads")
    assert rc == 0
    assert out.splitlines()[0].split() == [
        "POD", "IPS", "MODE", "AGENT", "KERNEL", "PROXY", "IDENTITY"
    ]  # fmt: skip

    certs = mesh.json("node-2", "certs", schema=schemas.CERTS)["certificates"]
    assert [c["identity"] for c in certs] == [
        "spiffe://cluster.local/ns/default/sa/db",
        SERVER_ID,
    ]
    now = datetime.datetime.now(datetime.UTC)
    for cert in certs:
        not_after = datetime.datetime.fromisoformat(cert["not_after"])
        renewal = datetime.datetime.fromisoformat(cert["renewal_due"])
        assert now < renewal < not_after
        assert int(cert["serial"], 16) > 0


def test_services_and_policies_are_those_in_force_on_the_node(mesh):
    services = mesh.json("node-1", "services", schema=schemas.SERVICES)["services"]
    assert [(s["service"], s["vips"], [e["ips"] for e in s["endpoints"]]) for s in services] == [
        ("default/db", ["10.96.0.11"], [[str(mesh.pods["db"].ipv4)]]),
        ("default/server", [SERVER_VIP], [[str(mesh.pods["server"].ipv4)]]),
    ]
    # A node gets only the policies that select its own pods.
    assert mesh.json("node-1", "policies", schema=schemas.POLICIES)["policies"] == []
    policies = mesh.json("node-2", "policies", schema=schemas.POLICIES)["policies"]
    assert [(p["policy"], p["action"], p["selects"]) for p in policies] == [
        ("default/db-allow-server", "ALLOW", ["default/db"]),
        ("default/db-deny-legacy", "DENY", ["default/db"]),
        ("default/server-allow-client", "ALLOW", ["default/server"]),
    ]
    assert policies[1]["rules"][0]["source_namespaces"] == ["legacy"]


def test_connections_shows_a_live_connection_from_both_ends(mesh):
    # Nothing accepts on the server's 8080: the kernel's backlog takes the
    # connection and its bytes, so it stays open as long as the client holds it.
    with netns_mod.entered(mesh.pods["server"].netns):
        backlog = socket.create_server(("0.0.0.0", 8080))
    with backlog:
        with netns_mod.entered(mesh.pods["client"].netns):
            held = socket.create_connection((SERVER_VIP, 80), timeout=5)
        with held:
            held.sendall(b"x" * 1000)
            deadline = time.monotonic() + 10
            while True:
                ends = {
                    node: mesh.json(node, "connections", schema=schemas.CONNECTIONS)["connections"]
                    for node in ("node-1", "node-2")
                }
                if all(c and c[0]["bytes_up"] == 1000 for c in ends.values()):
                    break
                assert time.monotonic() < deadline, ends
                time.sleep(0.2)
    for node, direction in (("node-1", "outbound"), ("node-2", "inbound")):
        [conn] = ends[node]
        assert conn["direction"] == direction
        assert conn["src"]["workload"] == "default/client"
        assert conn["src"]["identity"] == CLIENT_ID
        assert conn["dst"]["workload"] == "default/server"
        assert conn["dst"]["identity"] == SERVER_ID
        assert conn["security_policy"] == "mutual_tls"
        assert conn["age_seconds"] > 0


def test_pod_reports_capture_removed_behind_the_agents_back(mesh):
    ok = mesh.json("node-1", "pod", "default/client", schema=schemas.POD)
    assert ok["capture"] == {"mode": ok["capture"]["mode"], "as_expected": True, "diff": []}
    assert ok["listeners"]["missing"] == []
    assert ok["proxy"] == {"served": True, "identity": CLIENT_ID}
    assert ok["certificate"]["identity"] == CLIENT_ID

    intruder = mesh.pods["intruder"]
    subprocess.run(
        ["ip", "netns", "exec", intruder.netns_name, "iptables", "-t", "nat", "-F"],
        check=True, timeout=30,
    )  # fmt: skip
    broken = mesh.json("node-1", "pod", "legacy/intruder", schema=schemas.POD, code=1)
    # The agent still believes it captured; the kernel says otherwise.
    assert broken["agent_status"] == "captured"
    assert broken["capture"]["as_expected"] is False
    diff = "\n".join(broken["capture"]["diff"])
    assert "nat/OUTPUT: missing jump" in diff
    assert "nat/PREROUTING: missing jump" in diff
    assert "REDIRECT --to-ports 15001" in diff
    assert any(p.startswith("capture: NOT as expected") for p in broken["problems"])
    rc, out = mesh.weir_node("node-1", "pod", "legacy/intruder")
    assert rc == 1
    assert "NOT CAPTURED" in out and "capture diff (expected vs installed):" in out

    # The node-wide answers see it too, from the kernel, though the agent does not.
    status = mesh.json("node-1", "status", schema=schemas.STATUS, code=1)
    assert status["pods"] == {"seen": 2, "captured": 1}
    workloads = mesh.json("node-1", "workloads", schema=schemas.WORKLOADS, code=1)
    assert [(w["pod"], w["capture_in_kernel"]) for w in workloads["workloads"]] == [
        ("default/client", True),
        ("legacy/intruder", False),
    ]
    # The other pod's capture is untouched.
    mesh.json("node-1", "pod", "default/client", schema=schemas.POD)
    rc, out = mesh.weir_node("node-1", "pod", "default/nobody")
    assert (rc, out.splitlines()[-1]) == (1, "problem: default/nobody: not enrolled on this node")


def test_bad_usage_exits_2(mesh):
    for args in (("pod", "no-namespace"), ("status", "-o", "xml"), ("nonsense",)):
        rc, _ = mesh.weir_node("node-1", *args)
        assert rc == 2, args


def test_admin_listeners_answer_only_on_loopback(mesh):
    node1 = mesh.local.nodes["node-1"].node
    for port in (ADMIN_PORT, PROXY_ADMIN_PORT):
        assert admin_request(node1.netns, "GET", port, "/healthz/ready")[0] == 200
        # From the other node, from the underlay, and to the node's own address
        # from the node itself: nothing listens there.
        others = (mesh.local.nodes["node-2"].node.netns, mesh.local.topology.underlay)
        for ns in (*others, node1.netns):
            with netns_mod.entered(ns), pytest.raises(ConnectionRefusedError):
                socket.create_connection((str(node1.underlay_ipv4), port), timeout=5)


@pytest.mark.parametrize("which", ["proxy", "agent"])
def test_a_logging_change_takes_effect_in_the_running_process(mesh, which):
    node = mesh.local.nodes["node-1"]
    process = node.proxy if which == "proxy" else node.agent
    port = PROXY_ADMIN_PORT if which == "proxy" else ADMIN_PORT
    assert process is not None
    status, levels = admin_request(node.node.netns, "GET", port, "/logging")
    assert status == 200
    initial = levels["admin"]
    assert initial in ("info", "warning")

    def drop_a_request() -> None:
        """A request head cut short: the endpoint logs it at debug, and only at debug."""
        with netns_mod.entered(node.node.netns):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        with sock:
            sock.sendall(b"GET /cut-short")
            sock.shutdown(socket.SHUT_WR)
            # Closed without an answer once the endpoint has dropped (and logged) it.
            assert sock.recv(1) == b""

    def dropped() -> int:
        return process.log.read_text(errors="replace").count("HTTP request dropped")

    before = dropped()
    drop_a_request()
    status, levels = admin_request(node.node.netns, "POST", port, "/logging?admin=debug")
    assert (status, levels["admin"]) == (200, "debug")
    try:
        drop_a_request()
        deadline = time.monotonic() + 5
        while dropped() == before:
            assert time.monotonic() < deadline, process.tail()
            time.sleep(0.1)
        # Only the one after the change: the first was dropped below the level in force.
        assert dropped() == before + 1
    finally:
        admin_request(node.node.netns, "POST", port, f"/logging?admin={initial}")
    status, body = admin_request(node.node.netns, "POST", port, "/logging?admin=loud")
    assert status == 400 and "not one of" in body["error"]


def test_quitquitquit_stops_the_proxy_gracefully(mesh):
    node = mesh.local.nodes["node-2"]
    proxy, keeper = node.proxy, node.proxy_keeper
    assert proxy is not None and keeper is not None
    with keeper.paused():
        status, body = admin_request(node.node.netns, "POST", PROXY_ADMIN_PORT, "/quitquitquit")
        assert (status, body) == (200, {"status": "stopping"})
        assert proxy.popen.wait(timeout=30) == 0
        rc, out = mesh.weir_node("node-2", "status")
        assert rc == 1
        assert "proxy:         NOT REACHABLE" in out
    # As the kubelet would, the local mesh starts it again.
    deadline = time.monotonic() + 30
    while mesh.weir_node("node-2", "status")[0] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert node.proxy is not proxy


def test_trace_names_the_deciding_policy_on_the_destinations_node(mesh):
    denied = mesh.json(
        "node-2", "trace", "legacy/intruder", "default/db:5432", schema=schemas.TRACE, code=1
    )
    assert denied["source"]["identity"] == INTRUDER_ID
    assert denied["service"] == "default/db" and denied["route"] == "mesh"
    [endpoint] = denied["endpoints"]
    db = mesh.pods["db"]
    assert endpoint["address"] == f"{db.ipv4}:5432"
    assert (endpoint["allowed"], endpoint["reason"]) == (False, "deny:default/db-deny-legacy")
    assert denied["problems"] == ["default/db: denied (deny:default/db-deny-legacy)"]

    allowed = mesh.json(
        "node-2", "trace", "default/client", SERVER_VIP + ":80", schema=schemas.TRACE
    )
    [endpoint] = allowed["endpoints"]
    assert endpoint["address"] == f"{mesh.pods['server'].ipv4}:8080"
    assert (endpoint["allowed"], endpoint["reason"]) == (True, "allow:default/server-allow-client")
    # The source runs on node-1: only there is its capture known.
    assert allowed["source"]["captured"] is None

    # On the source's node: capture checked in the kernel; the policy is node-2's to decide.
    here = mesh.json("node-1", "trace", "default/client", "default/server", schema=schemas.TRACE)
    assert here["source"]["captured"] is True
    assert [(e["allowed"], e["node"]) for e in here["endpoints"]] == [(None, "node-2")]
    outside = mesh.json("node-1", "trace", "default/client", "192.0.2.9:443", schema=schemas.TRACE)
    assert (outside["route"], outside["endpoints"]) == ("passthrough", [])
    rc, _ = mesh.weir_node("node-1", "trace", "default/client", "default/server:x")
    assert rc == 2


def test_quitquitquit_stops_the_agent_gracefully_and_pods_stay_captured(mesh):
    node = mesh.local.nodes["node-1"]
    agent = node.agent
    assert agent is not None
    status, body = admin_request(node.node.netns, "POST", ADMIN_PORT, "/quitquitquit")
    assert (status, body) == (200, {"status": "stopping"})
    assert agent.popen.wait(timeout=30) == 0
    rc, out = mesh.weir_node("node-1", "status")
    assert (rc, out) == (1, "")  # the reason is on stderr: nothing answers on 15000
    # Capture lives in the pods' netns, not in the agent: it outlives the agent.
    rules = subprocess.run(
        ["ip", "netns", "exec", mesh.pods["client"].netns_name, "iptables-save", "-t", "nat"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert "-j WEIR-OUTBOUND" in rules
    mesh.local.restart_agent("node-1")
    mesh.local.wait_agent_ready("node-1")
    client = mesh.json("node-1", "pod", "default/client", schema=schemas.POD)
    assert client["capture"]["as_expected"] is True


def test_pod_checks_ebpf_capture_and_reports_entries_removed_behind_the_agents_back(monkeypatch):
    # The agents read the mode from the environment they are started with.
    monkeypatch.setenv("WEIR_REDIRECT_MODE", "ebpf")
    with LocalMesh(MESH_YAML, real_proxy) as local:
        node = local.add_node("node-1", "10.244.1.0/24")
        client = local.add_pod("node-1", "client")

        def weir(*args: str) -> tuple[int, str]:
            # nsenter, not ip netns exec: that one remounts /sys, hiding the eBPF pins.
            proc = subprocess.run(
                ["nsenter", f"--net={node.node.netns.path}", *weir_command(), *args],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert "Traceback" not in proc.stderr, proc.stderr
            return proc.returncode, proc.stdout

        pins = ("--bpf-pin-root", str(node.pins.root))
        rc, out = weir("node", "pod", "default/client", *pins, "-o", "json")
        ok = json.loads(out)
        assert schemas.errors(ok, schemas.POD) == []
        assert (rc, ok["capture"]) == (0, {"mode": "ebpf", "as_expected": True, "diff": []})

        rc, _ = weir("redirect", "remove", "--mode", "ebpf", "--netns", str(client.netns.path),
                     *pins)  # fmt: skip
        assert rc == 0
        rc, out = weir("node", "pod", "default/client", *pins, "-o", "json")
        broken = json.loads(out)
        assert rc == 1
        assert broken["agent_status"] == "captured"
        assert broken["capture"]["as_expected"] is False and broken["capture"]["diff"]
        rc, out = weir("node", "status", *pins, "-o", "json")
        assert (rc, json.loads(out)["pods"]) == (1, {"seen": 1, "captured": 0})

        # Under ip netns exec the pins cannot be seen, and the answer says why.
        proc = subprocess.run(
            ["ip", "netns", "exec", node.node.netns_name, *weir_command(), "node", "pod",
             "default/client", *pins],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 1 and "cannot see the eBPF pins" in proc.stdout
