"""Agent restarts under live traffic, with the real proxy and control plane.

A connection from client (node-1) to server (node-2) goes through both
proxies over HBONE and stays open while both agents are killed (-9) and
restarted; it keeps echoing. A pod created while its agent is down fails
closed and, once the agent is back, is enrolled and reaches the mesh.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from node_agent import netns as netns_mod
from node_agent.demo.mesh import wait_for_access_log
from node_agent.localmesh.cni_runtime import CniPluginError
from node_agent.localmesh.mesh import REPO, LocalMesh, real_proxy
from node_agent.localmesh.topology import Pod
from testbed.proxy_lab import EchoServer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

CONFIG = REPO / "examples" / "mesh.yaml"


def echo_once(conn: socket.socket, payload: bytes) -> bytes:
    conn.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def open_from(pod: Pod, address: str, port: int) -> socket.socket:
    with netns_mod.entered(pod.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect((address, port))
    return sock


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[LocalMesh, Pod, Pod, EchoServer]]:
    with LocalMesh(CONFIG, real_proxy) as local:
        local.add_node("node-1", "10.244.1.0/24")
        local.add_node("node-2", "10.244.2.0/24")
        client = local.add_pod("node-1", "client")
        server = local.add_pod("node-2", "server")
        echo = EchoServer(server, 8080)
        try:
            yield local, client, server, echo
        finally:
            echo.close()


def test_live_connection_survives_agent_restarts(mesh):
    local, client, server, _ = mesh
    conn = open_from(client, str(server.ipv4), 8080)
    with conn:
        assert echo_once(conn, b"before") == b"before"
        for node in ("node-1", "node-2"):
            local.restart_agent(node, kill=True)
        assert echo_once(conn, b"while the agents start") == b"while the agents start"
        for node in ("node-1", "node-2"):
            local.wait_agent_ready(node)
        assert echo_once(conn, b"after") == b"after"
    # And new connections still go through the mesh (the service VIP resolves via the proxy).
    with open_from(client, "10.96.0.10", 80) as fresh:
        assert echo_once(fresh, b"new") == b"new"


def test_pod_created_while_its_agent_is_down_is_captured_once_it_is_back(mesh):
    local, _, server, _ = mesh
    agent = local.nodes["node-1"].agent
    assert agent is not None
    agent.kill()
    with pytest.raises(CniPluginError) as failed:
        local.add_pod("node-1", "intruder", namespace="legacy")
    assert failed.value.code == 11
    local.restart_agent("node-1")
    local.wait_agent_ready("node-1")
    intruder = local.add_pod("node-1", "intruder", namespace="legacy")
    # Its connection goes out through its proxy with its own identity, and
    # server's proxy refuses it by policy (server admits only client).
    with open_from(intruder, str(server.ipv4), 8080) as conn:
        conn.sendall(b"let me in")
        assert conn.recv(100) == b""
    proxy = local.nodes["node-2"].proxy
    assert proxy is not None
    refused = wait_for_access_log(
        proxy,
        lambda e: (
            e["reporter"] == "destination"
            and e["src"].get("identity") == "spiffe://cluster.local/ns/legacy/sa/intruder"
        ),
        timeout_s=5,
    )
    assert [e["outcome"] for e in refused] == ["denied"]
