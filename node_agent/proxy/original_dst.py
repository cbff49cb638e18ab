"""Where a captured connection was going before capture redirected it.

Both capture modes answer the same getsockopt: iptables REDIRECT through
conntrack, the eBPF mode through a cgroup/getsockopt program. So the proxy
has one code path whichever mode put the connection on its listener.
IPv4, every captured connection of most clusters, asks in C (_socket_calls.c).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from node_agent.proxy._socket_calls import original_destination_v4

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: what original_destination_v4 asks
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOCKADDR_IN6_LEN = 28


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """(address, port) the client connected to; raises OSError if it was not redirected."""
    return original_destination_of(sock.fileno(), sock.family)


def original_destination_of(fd: int, family: int) -> tuple[str, int]:
    """original_destination of the socket `fd` of `family`: the proxy knows both from its
    listener, and asking the socket object costs a syscall and an enum per connection."""
    if family == socket.AF_INET:
        return original_destination_v4(fd)
    borrowed = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 0, fd)
    try:
        raw = borrowed.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
    finally:
        borrowed.detach()  # the fd stays its owner's
    port, packed = struct.unpack_from("!2xH4x16s", raw)
    return str(ipaddress.IPv6Address(packed)), port
