"""Certificates rotate under live connections; shutdown stops accepting, drains, then cuts."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import time
from collections.abc import Iterator

import pytest

from node_agent.netns import entered
from testbed.proxy_lab import MeshLab, a_to_b
from weir_common.mesh import SpiffeId

pytestmark = pytest.mark.netns

APP_PORT = 8080


@contextlib.contextmanager
def two_nodes(tmp_path, ttl: datetime.timedelta | None = None) -> Iterator[MeshLab]:
    with a_to_b(tmp_path, APP_PORT, certificate_ttl=ttl) as (lab, _):
        yield lab


def connect(lab: MeshLab) -> socket.socket:
    with entered(lab.pods["a"].netns):
        sock = socket.socket()
    sock.settimeout(5)
    sock.connect((str(lab.pods["b"].ipv4), APP_PORT))
    return sock


def ping(sock: socket.socket, message: bytes) -> None:
    sock.sendall(message)
    received = b""
    while len(received) < len(message):
        chunk = sock.recv(len(message) - len(received))
        assert chunk, "connection closed"
        received += chunk
    assert received == message


def one_shot(lab: MeshLab, message: bytes) -> None:
    with connect(lab) as sock:
        ping(sock, message)


def test_rotation_keeps_live_connections_and_new_ones_use_new_certs(tmp_path):
    # 4 s certificates renew at about 2 s: the loop below spans two renewals.
    with two_nodes(tmp_path, datetime.timedelta(seconds=4)) as lab:
        a_id = SpiffeId("cluster.local", "default", "a")
        issued_for_a = lambda: lab.nodes["node-1"].certificates.issued.count(a_id)  # noqa: E731
        pool = lab.nodes["node-1"].proxy.pool
        first_issue = issued_for_a()
        long_lived = connect(lab)
        with long_lived:
            deadline = time.monotonic() + 5
            i = 0
            while time.monotonic() < deadline:
                ping(long_lived, b"still here %d" % i)
                i += 1
                time.sleep(0.1)
            assert issued_for_a() >= first_issue + 2
            dials = pool.dials
            one_shot(lab, b"new connection after rotation")
            assert pool.dials == dials + 1  # a fresh handshake, with the new certificate
            ping(long_lived, b"and the old one still works")


def test_shutdown_drains_then_cuts(tmp_path):
    with two_nodes(tmp_path) as lab:
        proxy = lab.nodes["node-2"].proxy
        lingering = connect(lab)
        ping(lingering, b"before")
        finishing = connect(lab)
        ping(finishing, b"before")
        started = time.monotonic()
        done = asyncio.run_coroutine_threadsafe(proxy.shutdown(deadline=2.0), lab.loop.loop)
        time.sleep(0.3)
        assert not proxy.ready
        # No new connections, but open ones carry on while draining.
        with pytest.raises(AssertionError):
            one_shot(lab, b"refused")
        ping(lingering, b"during the drain")
        finishing.close()  # ends on its own before the deadline
        # The other is cut when the deadline passes, and shutdown returns.
        done.result(timeout=5)
        assert 1.8 < time.monotonic() - started < 4
        with pytest.raises((AssertionError, ConnectionError, TimeoutError)):
            ping(lingering, b"after")
        lingering.close()
        entries = lab.nodes["node-2"].access_log.entries
        assert any(e["reason"] == "proxy shut down" for e in entries)
