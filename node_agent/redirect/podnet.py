"""What a pod's netns holds, read from inside it: its id, its addresses, its TCP sockets.

Shared by the eBPF capture (which keys its maps by these) and the self-check
(which looks for its probe connection on the proxy's side). Reading only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from node_agent import netns as netns_mod
from node_agent.netns import Netns
from weir_common.errors import NodeSetupError, TransientError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SO_NETNS_COOKIE: Final = 71  # asm-generic/socket.h, Linux 5.14+
_RT_SCOPE_UNIVERSE: Final = 0  # what `ip` calls scope global
_IP_FAMILIES: Final = (socket.AF_INET, socket.AF_INET6)
TCP_LISTEN: Final = 0x0A
TCP_ESTABLISHED: Final = 0x01
TCP_SYN_RECV: Final = 0x03


def netns_cookie(ns: Netns) -> int:
    """The kernel's 64-bit id of `ns`: what BPF programs get from bpf_get_netns_cookie()."""
    with netns_mod.entered(ns), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8)
        except OSError as e:
            raise NodeSetupError(f"SO_NETNS_COOKIE unsupported (Linux 5.14+ needed): {e}") from None
    return int(struct.unpack("<Q", raw)[0])


def pod_addresses(ns: Netns) -> list[IPAddress]:
    """The pod's global-scope addresses: what peers dial it at."""
    try:
        # The netlink socket is made inside the pod, so the dump is the pod's.
        with netns_mod.entered(ns), IPRoute() as ipr:
            messages = list(ipr.addr("dump"))
    except NetlinkError as e:
        raise TransientError(f"reading addresses in {ns.path}: {os.strerror(e.code)}") from None
    found: list[IPAddress] = []
    for msg in messages:
        if msg["scope"] != _RT_SCOPE_UNIVERSE or msg["family"] not in _IP_FAMILIES:
            continue
        # IFA_LOCAL is the address itself; IPv6 sends only IFA_ADDRESS, and on a
        # point-to-point link IFA_ADDRESS is the peer's.
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        found.append(ipaddress.ip_address(local))
    return found


@dataclass(frozen=True)
class TcpSocket:
    family: int  # 4 or 6
    local: tuple[IPAddress, int]
    remote: tuple[IPAddress, int]
    state: int
    inode: int


def _proc_address(text: str, family: int) -> tuple[IPAddress, int]:
    # The kernel prints each 32-bit word of the address in host byte order.
    hex_ip, hex_port = text.split(":")
    words = bytes.fromhex(hex_ip)
    raw = b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4))
    ip: IPAddress = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
    return ip, int(hex_port, 16)


def parse_proc_net_tcp(text: str, family: int) -> list[TcpSocket]:
    """/proc/net/tcp or tcp6 (little-endian hosts), one TcpSocket per line."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        out.append(
            TcpSocket(
                family,
                _proc_address(f[1], family),
                _proc_address(f[2], family),
                int(f[3], 16),
                int(f[9]),
            )
        )
    return out


def tcp_sockets(ns: Netns) -> list[TcpSocket]:
    """Every TCP socket of the netns, IPv4 and IPv6."""
    out: list[TcpSocket] = []
    with netns_mod.entered(ns):
        for family, table in ((4, "tcp"), (6, "tcp6")):
            path = Path(f"/proc/thread-self/net/{table}")
            if path.exists():
                out += parse_proc_net_tcp(path.read_text(), family)
    return out
