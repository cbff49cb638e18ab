"""NetnsSocketFactory: sockets made in a pod's netns on the calling thread, its fd kept once."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from node_agent.constants import PROXY_MARK
from node_agent.localmesh.topology import LocalTopology
from node_agent.proxy.sockets import NetnsSocketFactory

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
