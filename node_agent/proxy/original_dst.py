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
    if sock.family == socket.AF_INET:
        return original_destination_v4(sock)
    raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
    port, packed = struct.unpack_from("!2xH4x16s", raw)
    return str(ipaddress.IPv6Address(packed)), port
