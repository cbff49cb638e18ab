"""A peer node cut off mid-connection: both proxies give up on it, nothing hangs.

Two nodes, a proxy on each, real capture and certificates. Pod a (node-1)
holds a connection to b (node-2) through HBONE; then node-2's netns silently
drops every packet of port 15008 (no RST, no ICMP: a crashed node or a cut
link looks like this). Each proxy PINGs the silent side, gets no answer, and
aborts: a's connection is reset and b's upstream connection closed within
the keepalive's interval + timeout, instead of hanging until TCP gives up
(never, for a connection with nothing to send). Once the link is back, a new
connection goes through on a fresh HBONE connection.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_agent.constants import INBOUND_TUNNEL_PORT
from node_agent.localmesh.topology import Node
from node_agent.proxy.http2.keepalive import KeepaliveSettings
from node_agent.proxy.telemetry import SILENT_PEERS
from testbed.proxy_lab import LAB_SETTINGS, EchoServer, MeshLab, a_to_b

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

APP_PORT = 8080
KEEPALIVE = KeepaliveSettings(interval=0.5, timeout=0.5)
# Both directions of the tunnel port, in the forwarding path of node-2.
CUT_RULES = (
    ["FORWARD", "-p", "tcp", "--dport", str(INBOUND_TUNNEL_PORT), "-j", "DROP"],
    ["FORWARD", "-p", "tcp", "--sport", str(INBOUND_TUNNEL_PORT), "-j", "DROP"],
)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[MeshLab, EchoServer]]:
    settings = dataclasses.replace(LAB_SETTINGS, hbone_keepalive=KEEPALIVE)
    with a_to_b(tmp_path, APP_PORT, settings) as pair:
        yield pair


def _iptables(node: Node, action: str, rule: list[str]) -> None:
    done = node.run(["iptables", action, *rule])
    assert done.returncode == 0, done.stderr


def _connected(lab: MeshLab) -> socket.socket:
    sock = lab.pods["a"].connect(lab.pods["b"].ipv4, APP_PORT)
    sock.sendall(b"hello")
    assert sock.recv(5) == b"hello"
    return sock


def _silent_peers(lab: MeshLab, node: str, direction: str) -> float:
    return lab.nodes[node].proxy.metrics.value(SILENT_PEERS, direction=direction)


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def _until_ended(sock: socket.socket, timeout: float) -> None:
    """Return once the connection is reset or closed; fail if it is still open after `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the app's connection still hangs after {timeout} s") from None


def test_a_cut_off_peer_is_given_up_on_both_sides_and_a_new_connection_dials_afresh(
    lab: tuple[MeshLab, EchoServer],
) -> None:
    mesh, server = lab
    node_2 = mesh.nodes["node-2"].node
    sock = _connected(mesh)
    dials = mesh.nodes["node-1"].proxy.pool.dials
    for rule in CUT_RULES:
        _iptables(node_2, "-I", rule)
    try:
        cut = time.monotonic()
        _until_ended(sock, timeout=10.0)
        # One quiet interval and one unanswered timeout: about 1 s here.
        assert time.monotonic() - cut < 4.0
        _wait(
            "node-1 counts the peer it dialed as silent",
            lambda: _silent_peers(mesh, "node-1", "outbound") == 1,
            3.0,
        )
        _wait(
            "node-2 counts its client as silent",
            lambda: _silent_peers(mesh, "node-2", "inbound") == 1,
            3.0,
        )
        # And b's side lets go of the app's connection (its own read timeout is 30 s).
        _wait("b's connection ends", lambda: len(server.exchanges) == 1, 3.0)
    finally:
        sock.close()
        for rule in CUT_RULES:
            _iptables(node_2, "-D", rule)
    again = _connected(mesh)
    again.close()
    assert mesh.nodes["node-1"].proxy.pool.dials == dials + 1
