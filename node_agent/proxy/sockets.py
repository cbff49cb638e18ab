"""Sockets in pod network namespaces, the proxy's only way into a pod.

As in ztunnel, the proxy never enters a namespace itself: it asks a
SocketFactory for a socket that belongs to a pod's netns and carries the
proxy mark, and from then on uses it from the event loop like any other. A
socket belongs for life to the netns it was created in, so only creation
needs the calling thread inside (_socket_calls.c steps in and back in one
call, on the event loop's own thread: no thread hop per connection). Each
pod's netns fd is opened once and kept until `forget`, so an upstream socket
costs two setns(2) calls and no path lookups.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Final, Protocol

from node_agent.constants import PROXY_MARK
from node_agent.netns import Netns, open_fd
from node_agent.proxy._socket_calls import socket_in_netns

LISTEN_BACKLOG: Final = 1024


class _Inet4StreamSocket(socket.socket):
    """A socket.socket whose family and type are plain class attributes.

    socket.socket makes each an enum member anew on every read, a few Python
    calls; uvloop reads both for every upstream connection it is handed.
    """

    __slots__ = ()
    family = socket.AF_INET
    type = socket.SOCK_STREAM


class _Inet6StreamSocket(socket.socket):
    """_Inet4StreamSocket's IPv6 twin."""

    __slots__ = ()
    family = socket.AF_INET6
    type = socket.SOCK_STREAM


_STREAM_SOCKETS: Final[dict[int, type[socket.socket]]] = {
    socket.AF_INET: _Inet4StreamSocket,
    socket.AF_INET6: _Inet6StreamSocket,
}


class SocketFactory(Protocol):
    def listener(self, netns: Netns, family: socket.AddressFamily, port: int) -> socket.socket:
        """A non-blocking listening socket on the wildcard address of `netns`."""
        ...

    def stream(self, netns: Netns, family: socket.AddressFamily) -> socket.socket:
        """A non-blocking, unconnected TCP socket of `netns`, ready to connect."""
        ...

    def forget(self, netns: Netns) -> None:
        """No more sockets in `netns`: let go of anything kept for it."""
        ...


class NetnsSocketFactory:
    """Sockets created inside the pod's netns, marked so capture lets them through."""

    def __init__(self, mark: int = PROXY_MARK) -> None:
        self._mark = mark
        self._netns_fds: dict[Netns, int] = {}
        self._home = threading.local()  # each thread's own netns fd, to step back into

    def listener(self, netns: Netns, family: socket.AddressFamily, port: int) -> socket.socket:
        sock = self._create(netns, family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # A proxy's successor (same UID, a rolling update's surge pod)
            # opens the same ports in the pod while this one still listens.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # IPv4 gets its own listener: SO_ORIGINAL_DST needs a real AF_INET socket.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))  # noqa: S104
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    def stream(self, netns: Netns, family: socket.AddressFamily) -> socket.socket:
        return self._create(netns, family)

    def forget(self, netns: Netns) -> None:
        fd = self._netns_fds.pop(netns, None)
        if fd is not None:
            os.close(fd)

    def _create(self, netns: Netns, family: socket.AddressFamily) -> socket.socket:
        fd = self._netns_fds.get(netns)
        if fd is None:
            fd = self._netns_fds[netns] = open_fd(netns)
        home: int | None = getattr(self._home, "fd", None)
        if home is None:
            home = self._home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        cls = _STREAM_SOCKETS.get(family, socket.socket)
        return socket_in_netns(fd, home, family, self._mark, cls)
