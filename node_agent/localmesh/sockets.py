"""TCP sockets that live in a given netns, usable from any thread afterwards."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

from node_agent.netns import Netns, entered


def _socket_in(netns: Netns, family: socket.AddressFamily) -> socket.socket:
    # A socket belongs for life to the netns it was created in, so only the
    # creation needs the thread inside; bind/connect/accept work from anywhere.
    with entered(netns):
        return socket.socket(family, socket.SOCK_STREAM)


def _family(address: IPv4Address | IPv6Address) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def open_listener(
    netns: Netns, address: IPv4Address | IPv6Address, port: int = 0, backlog: int = 16
) -> socket.socket:
    """A listening TCP socket in `netns`; port 0 picks a free one (see getsockname)."""
    sock = _socket_in(netns, _family(address))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(address), port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def open_connection(
    netns: Netns, address: IPv4Address | IPv6Address, port: int, timeout: float = 5.0
) -> socket.socket:
    """A TCP connection from `netns`; raises OSError (errno set) if it cannot connect."""
    sock = _socket_in(netns, _family(address))
    try:
        sock.settimeout(timeout)
        sock.connect((str(address), port))
    except BaseException:
        sock.close()
        raise
    return sock
