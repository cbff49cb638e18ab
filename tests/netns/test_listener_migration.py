"""What the agent sets in a pod netns lets a closing proxy hand its queue to its successor.

Two listeners share a port (SO_REUSEPORT, as an old proxy and its successor
do in every pod). Connections are made and left unaccepted, so some sit in
each listener's queue; then the old listener closes. With the sysctl the
agent sets, every one of them is accepted by the successor; without it, the
ones queued on the old listener are reset (the control case, which shows
this test can fail).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent import netns as netns_mod
from node_agent.netns import Netns
from node_agent.proxy_handoff.listener_migration import ListenerMigration

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

CLIENTS = 64
PORT = 15001


@pytest.fixture
def pod_netns(loopback_netns: Netns) -> Netns:
    return loopback_netns


def _listener(ns: Netns) -> socket.socket:
    with netns_mod.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", PORT))
    sock.listen(CLIENTS)
    return sock


def _survivors_after_old_listener_closes(ns: Netns) -> int:
    """How many of CLIENTS queued connections the successor accepts and can talk to."""
    old, successor = _listener(ns), _listener(ns)
    clients: list[socket.socket] = []
    try:
        for _ in range(CLIENTS):
            with netns_mod.entered(ns):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(2)
            client.connect(("127.0.0.1", PORT))
            clients.append(client)
        old.close()
        successor.settimeout(0.5)
        survivors = 0
        for _ in range(CLIENTS):
            try:
                accepted, _ = successor.accept()
            except TimeoutError:
                break
            with accepted:
                accepted.sendall(b"x")
        for client in clients:
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                survivors += client.recv(1) == b"x"
        return survivors
    finally:
        successor.close()
        for client in clients:
            client.close()


def test_queued_connections_move_to_the_successor(pod_netns: Netns) -> None:
    assert ListenerMigration().enable(pod_netns)
    with netns_mod.entered(pod_netns), open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        assert f.read().strip() == "1"
    assert _survivors_after_old_listener_closes(pod_netns) == CLIENTS


def test_without_it_the_old_listeners_queue_is_reset(pod_netns: Netns) -> None:
    survivors = _survivors_after_old_listener_closes(pod_netns)
    # SO_REUSEPORT spreads by hash: with 64 connections, both queues hold some.
    assert survivors < CLIENTS


def test_a_node_that_cannot_set_it_says_so_and_goes_on(
    pod_netns: Netns, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    migration = ListenerMigration(roots=(tmp_path / "no-such-proc-sys",))
    assert not migration.enable(pod_netns)
    assert not migration.enable(pod_netns)
    warnings = [r for r in caplog.records if "tcp_migrate_req" in r.getMessage()]
    assert len(warnings) == 1


def test_with_a_read_only_proc_sys_it_is_set_through_the_parents_root(pod_netns: Netns) -> None:
    # As in a container: /proc/sys read-only, the parent (the runtime's shim)
    # in a mount namespace whose /proc is writable.
    script = (
        "from node_agent.netns import Netns\n"
        "from node_agent.proxy_handoff.listener_migration import ListenerMigration\n"
        f"raise SystemExit(0 if ListenerMigration().enable(Netns.validate({str(pod_netns.path)!r}))"
        " else 3)\n"
    )
    done = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys"
            ' && exec "$0" -c "$1"',
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with netns_mod.entered(pod_netns), open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        assert f.read().strip() == "1"
