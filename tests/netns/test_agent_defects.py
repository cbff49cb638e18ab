"""Defects that lost pods or traffic, reproduced on the real local mesh and now fixed.

Real control plane, real agents and proxies (UID 1337), pods made by each
node's CNI chain with the frozen weir-cni, as in `weir demo`:

- twenty ADDs at once on one node are all kept, served after a proxy restart,
  and a DEL of each removes its capture;
- an agent killed in the middle of an ADD, after capture was applied, leaves
  a retryable error (11) and, once restarted, no capture behind;
- after an agent restart and then a control-plane restart, every pod's IP is
  registered again and services keep their endpoints.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_agent.demo.mesh import access_log
from node_agent.localmesh.cni_runtime import CniPluginError, invoke_chain
from node_agent.localmesh.mesh import (
    CONTROLPLANE_HTTP_PORT,
    LocalMesh,
    http_get,
    real_proxy,
)
from node_agent.localmesh.topology import POD_IFNAME, Pod
from node_agent.localmesh.traffic import TrafficObserver, connect
from node_agent.localmesh.wiring import NETNS_DIR
from node_agent.netns import Netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

BURST = 20
ECHO_VIP = "10.96.0.20"
BURST_IDENTITY = "spiffe://cluster.local/ns/default/sa/burst"


def mesh_config(path: Path) -> Path:
    workloads: list[dict[str, Any]] = [
        {
            "name": f"burst-{i:02d}",
            "namespace": "default",
            "serviceAccount": "burst",
            "node": "node-1",
            "labels": {"app": "burst"},
        }
        for i in range(BURST)
    ]
    for name, node, sa in (
        ("echo", "node-2", "echo"),
        ("victim", "node-1", "burst"),
        ("steady", "node-1", "burst"),
    ):
        workloads.append(
            {
                "name": name,
                "namespace": "default",
                "serviceAccount": sa,
                "node": node,
                "labels": {"app": name},
            }
        )
    doc = {
        "trustDomain": "cluster.local",
        "nodes": [
            {"name": "node-1", "bootstrapToken": "test-node-1-token"},
            {"name": "node-2", "bootstrapToken": "test-node-2-token"},
        ],
        "namespaces": [{"name": "default", "mtlsMode": "STRICT"}],
        "workloads": workloads,
        "services": [
            {
                "name": "echo",
                "namespace": "default",
                "vips": [ECHO_VIP],
                "selector": {"app": "echo"},
                "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[tuple[LocalMesh, Pod, Pod, TrafficObserver]]:
    config = mesh_config(tmp_path_factory.mktemp("defects") / "mesh.yaml")
    with LocalMesh(config, real_proxy) as local, TrafficObserver() as apps:
        local.add_node("node-1", "10.244.1.0/24")
        local.add_node("node-2", "10.244.2.0/24")
        echo = local.add_pod("node-2", "echo")
        apps.listen(echo.netns, "echo", 8080, ipv6=False)
        # Keeps node-1's proxy holding the burst identity's certificate throughout.
        steady = local.add_pod("node-1", "steady")
        yield local, echo, steady, apps


def nat_rules(netns_name: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name, "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [line for line in out.splitlines() if "WEIR" in line]


def enrolled_pods(local: LocalMesh, node: str) -> list[dict[str, Any]]:
    status, body = http_get(
        local.nodes[node].node.netns, "127.0.0.1", 15000, "/config_dump?section=pods"
    )
    assert status == 200, body
    pods: list[dict[str, Any]] = json.loads(body)["pods"]
    return pods


def restart_proxy(local: LocalMesh, node: str) -> None:
    mesh_node = local.nodes[node]
    assert mesh_node.stop_proxy is not None
    mesh_node.stop_proxy()
    mesh_node.stop_proxy = real_proxy(local, mesh_node)


def connect_until_ok(pod: Pod, address: str, port: int, within_s: float = 30.0) -> str:
    """The token of the first connection that got through (a new proxy may still be syncing)."""
    deadline = time.monotonic() + within_s
    while True:
        attempt = connect(pod.netns, address, port, timeout=3)
        if attempt.outcome == "ok":
            return attempt.token
        assert time.monotonic() < deadline, f"{pod.name} -> {address}:{port}: {attempt.outcome}"
        time.sleep(0.2)


def test_twenty_concurrent_adds_are_all_kept_and_served_after_a_proxy_restart(mesh):
    local, echo, _, apps = mesh
    names = [f"burst-{i:02d}" for i in range(BURST)]
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        pods = list(pool.map(lambda name: local.add_pod("node-1", name), names))

    enrolled = enrolled_pods(local, "node-1")
    assert sorted(p["name"] for p in enrolled) == [*names, "steady"]
    assert {p["status"] for p in enrolled} == {"captured"}
    registry = json.loads((local.nodes["node-1"].dir / "state" / "pods.json").read_text())
    assert sorted(p["name"] for p in registry["pods"]) == [*names, "steady"]

    restart_proxy(local, "node-1")
    proxy = local.nodes["node-2"].proxy
    assert proxy is not None
    for pod in pods:
        token = connect_until_ok(pod, str(echo.ipv4), 8080)
        assert apps.wait_for(token, timeout=5) is not None
    deadline = time.monotonic() + 10
    while True:
        sources = {
            entry["src"].get("workload")
            for entry in access_log(proxy)
            if entry.get("reporter") == "destination"
            and entry.get("security_policy") == "mutual_tls"
            and entry["src"].get("identity") == BURST_IDENTITY
        }
        if {f"default/{name}" for name in names} <= sources or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {f"default/{name}" for name in names} <= sources

    # DEL of every one of them (at once, as a node drain does) removes its capture.
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        list(pool.map(local.topology.delete_attachment, pods))
    for pod in pods:
        assert nat_rules(pod.netns_name) == [], pod.name
    assert [p["name"] for p in enrolled_pods(local, "node-1")] == ["steady"]
    for pod in pods:
        local.topology.remove_pod(pod)


def test_an_agent_killed_mid_add_leaves_no_capture_once_restarted(mesh):
    local, _, _, _ = mesh
    node = local.nodes["node-1"]
    topology = local.topology
    netns_name = f"{topology.prefix}-pod-default-victim"
    subprocess.run(["ip", "netns", "add", netns_name], check=True)
    ns = Netns.validate(NETNS_DIR / netns_name)
    subprocess.run(["ip", "netns", "exec", netns_name, "ip", "link", "set", "lo", "up"], check=True)
    container_id = f"{topology.prefix}-default-victim"
    cni_args = {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": "default",
        "K8S_POD_NAME": "victim",
        "K8S_POD_INFRA_CONTAINER_ID": container_id,
        "K8S_POD_UID": "victim-uid",
    }
    conflist = topology.conflist(node.node)
    chain = {
        "container_id": container_id,
        "netns_path": ns.path,
        "ifname": POD_IFNAME,
        "cni_path": topology.cni_path,
        "cni_args": cni_args,
        "netns": node.node.netns,
    }
    assert local.controlplane is not None
    controlplane_pid = local.controlplane.popen.pid
    failures: list[BaseException] = []

    def add() -> None:
        try:
            invoke_chain(conflist, "ADD", **chain)
        except BaseException as e:
            failures.append(e)

    # A frozen control plane holds the ADD at registration, after capture is applied
    # (the proxy needs nothing from it: it holds the identity's certificate already).
    os.kill(controlplane_pid, signal.SIGSTOP)
    adding = threading.Thread(target=add)
    try:
        adding.start()
        deadline = time.monotonic() + 20
        while not nat_rules(netns_name):
            assert time.monotonic() < deadline, "capture was never applied"
            time.sleep(0.05)
        assert node.agent is not None
        node.agent.kill()
        adding.join(timeout=30)
        assert len(failures) == 1
        assert isinstance(failures[0], CniPluginError)
        assert failures[0].code == 11, failures[0]
        # Captured, no proxy will ever be told: what the next agent must undo.
        assert nat_rules(netns_name)
        registry = json.loads((node.dir / "state" / "pods.json").read_text())
        in_flight = [p["name"] for p in registry["pods"] if not p["enrolled"]]
        assert in_flight == ["victim"]
    finally:
        os.kill(controlplane_pid, signal.SIGCONT)
        adding.join(timeout=30)
    try:
        local.restart_agent("node-1")
        local.wait_agent_ready("node-1")
        assert nat_rules(netns_name) == []
        assert [p["name"] for p in enrolled_pods(local, "node-1")] == ["steady"]
    finally:
        invoke_chain(conflist, "DEL", **chain)
        subprocess.run(["ip", "netns", "delete", netns_name], check=False)


def registered_ips(local: LocalMesh) -> dict[str, list[str]]:
    """Pod -> IPs as the control plane holds them (what it builds endpoints from), for the
    two long-lived pods: the frozen control plane of the mid-ADD test may still apply a
    dead agent's registration after it thaws, which is not what this checks."""
    status, body = http_get(
        local.topology.underlay,
        str(local.topology.router_v4),
        CONTROLPLANE_HTTP_PORT,
        "/debug/config_dump",
    )
    assert status == 200, body
    registrations = json.loads(body)["registrations"]
    return {
        key: entry["ips"]
        for key, entry in registrations.items()
        if key in ("default/echo", "default/steady")
    }


def test_pods_stay_registered_across_an_agent_restart_then_a_controlplane_restart(mesh):
    local, echo, steady, apps = mesh
    expected = {"default/echo": [str(echo.ipv4)], "default/steady": [str(steady.ipv4)]}
    assert registered_ips(local) == expected
    for node in ("node-1", "node-2"):
        local.restart_agent(node, kill=True)
    for node in ("node-1", "node-2"):
        local.wait_agent_ready(node)
    local.restart_controlplane()
    deadline = time.monotonic() + 20
    while registered_ips(local) != expected:
        assert time.monotonic() < deadline, registered_ips(local)
        time.sleep(0.2)
    # The service still has its endpoint: the VIP reaches echo through both proxies.
    token = connect_until_ok(steady, ECHO_VIP, 80)
    arrival = apps.wait_for(token, timeout=5)
    assert arrival is not None
    assert arrival.listener == "echo"
