"""Sockets in pods: made in the pod's netns on the calling thread (its fd kept once),
and connected upstream from there without a thread hop."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import uvloop

from node_agent.constants import PROXY_MARK
from node_agent.localmesh.topology import LocalTopology
from node_agent.netns import Netns, entered
from node_agent.proxy._socket_calls import socket_in_netns
from node_agent.proxy.connections import UpstreamConnector, UpstreamError
from node_agent.proxy.hbone import TcpPeer
from node_agent.proxy.model import Workload
from node_agent.proxy.sockets import NetnsSocketFactory
from node_agent.proxy.state import PodState
from weir_common.mesh import SpiffeId

SIOCGSKNS = 0x894C  # linux/sockios.h: an fd of the netns a socket belongs to


def socket_netns_inode(sock: socket.socket) -> int:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def open_fds() -> set[str]:
    """This process's fds, less the one listing them."""
    found = set()
    for entry in Path("/proc/self/fd").iterdir():
        try:
            target = entry.readlink()
        except FileNotFoundError:
            continue  # the listing's own fd, closed by now
        if not str(target).endswith("/fd"):
            found.add(entry.name)
    return found


def test_sockets_belong_to_the_pod_and_its_netns_fd_is_opened_once(topology: LocalTopology) -> None:
    node = topology.add_node("node-1", "10.244.1.0/24")
    pod = topology.add_pod(node, "a")
    home = Path("/proc/thread-self/ns/net").stat().st_ino
    factory = NetnsSocketFactory()
    before = open_fds()
    made = [factory.stream(pod.netns, socket.AF_INET) for _ in range(3)]
    try:
        kept = open_fds() - before - {str(s.fileno()) for s in made}
        # One for the pod's netns, one for this thread's own to step back into.
        assert len(kept) == 2, kept
        for sock in made:
            assert socket_netns_inode(sock) == pod.netns.inode
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == PROXY_MARK
            assert not sock.getblocking()
            assert not sock.get_inheritable()  # close-on-exec, as Python's own sockets
            # What the class states without asking is what the kernel says.
            assert isinstance(sock, socket.socket)
            assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
        assert Path("/proc/thread-self/ns/net").stat().st_ino == home
        listener = factory.listener(pod.netns, socket.AF_INET, 0)
        made.append(listener)
        assert socket_netns_inode(listener) == pod.netns.inode
        assert open_fds() - before - {str(s.fileno()) for s in made} == kept
    finally:
        for sock in made:
            sock.close()
    factory.forget(pod.netns)
    # The thread's home fd stays for the next pod; the pod's is gone.
    assert len(open_fds() - before) == 1
    factory.forget(pod.netns)  # twice is fine


def test_a_failed_socket_in_a_netns_leaves_the_thread_home_and_no_fd(
    topology: LocalTopology,
) -> None:
    node = topology.add_node("node-1", "10.244.1.0/24")
    pod = topology.add_pod(node, "a")
    home_path = Path("/proc/thread-self/ns/net")
    home_inode = home_path.stat().st_ino
    home = os.open(home_path, os.O_RDONLY | os.O_CLOEXEC)
    netns_fd = os.open(pod.netns.path, os.O_RDONLY | os.O_CLOEXEC)
    not_a_netns = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = open_fds()
        with pytest.raises(OSError) as refused:
            socket_in_netns(not_a_netns, home, socket.AF_INET, PROXY_MARK)
        assert refused.value.errno == errno.EINVAL
        # Inside the pod, socket(2) itself fails: the thread still comes back.
        with pytest.raises(OSError) as unsupported:
            socket_in_netns(netns_fd, home, 4242, PROXY_MARK)
        assert unsupported.value.errno == errno.EAFNOSUPPORT
        with pytest.raises(ValueError, match="does not fit"):
            socket_in_netns(netns_fd, home, socket.AF_INET, 2**40)
        with pytest.raises(TypeError, match=r"subclass of socket\.socket"):
            socket_in_netns(netns_fd, home, socket.AF_INET, PROXY_MARK, dict)
        assert open_fds() == before
        assert home_path.stat().st_ino == home_inode
    finally:
        for fd in (home, netns_fd, not_a_netns):
            os.close(fd)


def pod_in(netns: Netns) -> PodState:
    workload = Workload("uid-a", "a", "default", "sa-a", "node-1", ("127.0.0.1",))
    return PodState(netns, workload, SpiffeId("cluster.local", "default", "sa-a"))


def listener_in(netns: Netns, backlog: int) -> socket.socket:
    with entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def test_upstream_connects_from_the_pod_and_reports_refusal(loopback_netns: Netns) -> None:
    connector = UpstreamConnector(NetnsSocketFactory(), connect_timeout=5, handshake_timeout=5)
    server = listener_in(loopback_netns, 8)
    port = server.getsockname()[1]

    async def run() -> None:
        transport, peer = await connector.connect(
            pod_in(loopback_netns), "127.0.0.1", port, TcpPeer
        )
        try:
            sock = transport.get_extra_info("socket")
            assert socket_netns_inode(sock) == loopback_netns.inode
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == PROXY_MARK
            assert sock.getpeername() == ("127.0.0.1", port)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # uvloop's doing
            # Known from the connect, not looked up with getsockname(2) on a lent write.
            assert peer.fd == sock.fileno()
            peer.write_lent(memoryview(bytearray(b"ping")))
            accepted, _ = server.accept()
            with accepted:
                accepted.settimeout(5)
                assert accepted.recv(16) == b"ping"
        finally:
            peer.abort()
        server.close()  # nothing listens there now
        with pytest.raises(UpstreamError, match="Connection refused"):
            await connector.connect(pod_in(loopback_netns), "127.0.0.1", port, TcpPeer)

    try:
        uvloop.run(run())
    finally:
        server.close()


def test_upstream_connect_gives_up_at_its_timeout_and_closes_the_socket(
    loopback_netns: Netns,
) -> None:
    # A full accept queue: Linux drops further SYNs, so the next connect hangs.
    server = listener_in(loopback_netns, 0)
    port = server.getsockname()[1]
    queued = []
    factory = NetnsSocketFactory()
    factory.stream(loopback_netns, socket.AF_INET).close()  # its netns fds, kept, are not counted
    connector = UpstreamConnector(factory, connect_timeout=0.3, handshake_timeout=5)

    async def run() -> None:
        with entered(loopback_netns):
            for _ in range(1):  # backlog 0 queues one
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                queued.append(client)
                client.settimeout(2)
                client.connect(("127.0.0.1", port))
        before = open_fds()
        started = time.monotonic()
        with pytest.raises(UpstreamError, match="timeout"):
            await connector.connect(pod_in(loopback_netns), "127.0.0.1", port, TcpPeer)
        assert 0.25 < time.monotonic() - started < 3.0
        assert open_fds() == before  # the socket given up on is closed

    try:
        uvloop.run(run())
    finally:
        for client in queued:
            client.close()
        server.close()


def test_upstream_connect_takes_no_thread(loopback_netns: Netns) -> None:
    """uvloop's sock_connect resolves even a literal address on libuv's thread
    pool, which starts 4 threads on first use: a fresh process shows none."""
    script = textwrap.dedent(
        f"""
        import os, socket, uvloop
        from node_agent.netns import Netns, entered
        from node_agent.proxy.connections import UpstreamConnector
        from node_agent.proxy.hbone import TcpPeer
        from node_agent.proxy.sockets import NetnsSocketFactory
        from tests.netns.test_proxy_sockets import listener_in, pod_in

        netns = Netns.validate({str(loopback_netns.path)!r})
        server = listener_in(netns, 64)
        port = server.getsockname()[1]
        connector = UpstreamConnector(NetnsSocketFactory(), connect_timeout=5, handshake_timeout=5)

        async def run():
            before = len(os.listdir("/proc/self/task"))
            for _ in range(20):
                transport, peer = await connector.connect(pod_in(netns), "127.0.0.1", port, TcpPeer)
                peer.abort()
            print(before, len(os.listdir("/proc/self/task")))

        uvloop.run(run())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = done.stdout.split()
    assert after == before, f"threads went from {before} to {after} while connecting"
