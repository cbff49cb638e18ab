"""Is capture really in effect for a pod? Open a real connection and see where it lands.

A capture that is configured but has no effect (a program overridden in a
child cgroup, rules in the wrong iptables backend, a pod whose netns changed)
looks healthy to every configuration check. The self-check does not look at
configuration: from inside the pod it connects to a probe address that only
capture can answer, and then looks on the proxy's side of the pod's socket
table for an accepted connection from exactly that client address and port.
It works the same for both modes, and needs the proxy (or anything) to
listen on 15001 in the pod: without a listener, a captured connection is
refused and nothing can be told apart.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Final

from node_agent import netns as netns_mod
from node_agent.constants import OUTBOUND_CAPTURE_PORT
from node_agent.netns import Netns
from node_agent.redirect.podnet import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    TCP_SYN_RECV,
    IPAddress,
    TcpSocket,
    pod_addresses,
    tcp_sockets,
)

# Documentation ranges (RFC 5737, RFC 3849): nothing real answers there, so a
# connection that reaches a listener was captured. The port is Weir's own.
PROBES: Final = {4: ("192.0.2.1", 15999), 6: ("2001:db8::1", 15999)}
_ACCEPT_WAIT_S: Final = 0.5


@dataclass(frozen=True)
class Verdict:
    family: int
    captured: bool | None  # None: could not tell (nothing listens on 15001)
    detail: str

    def line(self) -> str:
        state = {True: "captured", False: "NOT CAPTURED", None: "cannot verify"}[self.captured]
        return f"IPv{self.family}: {state}: {self.detail}"


def _listening(sockets: list[TcpSocket], family: int) -> bool:
    # An IPv6 wildcard listener may serve IPv4 too; the probe will tell.
    return any(
        s.state == TCP_LISTEN and s.local[1] == OUTBOUND_CAPTURE_PORT and s.family in (family, 6)
        for s in sockets
    )


def _plain(ip: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d as a.b.c.d: a dual-stack listener shows IPv4 peers that way."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _accepted_by_proxy(ns: Netns, client: tuple[IPAddress, int]) -> bool:
    deadline = time.monotonic() + _ACCEPT_WAIT_S
    while True:
        for s in tcp_sockets(ns):
            if (
                s.local[1] == OUTBOUND_CAPTURE_PORT
                and s.state in (TCP_ESTABLISHED, TCP_SYN_RECV)
                and s.remote[1] == client[1]
                and _plain(s.remote[0]) == _plain(client[0])
            ):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _probe(ns: Netns, family: int, timeout: float) -> Verdict:
    host, port = PROBES[family]
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with netns_mod.entered(ns):
        sock = socket.socket(af, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return Verdict(family, False, f"{host}:{port} was refused by something not the proxy")
        except (TimeoutError, OSError) as e:
            code = getattr(e, "errno", None)
            why = "unreachable" if code in (errno.ENETUNREACH, errno.EHOSTUNREACH) else "timed out"
            return Verdict(family, False, f"{host}:{port} went out uncaptured ({why})")
        local = sock.getsockname()
        client = (ipaddress.ip_address(local[0]), int(local[1]))
        if _accepted_by_proxy(ns, client):
            return Verdict(
                family, True, f"{host}:{port} landed on {OUTBOUND_CAPTURE_PORT} in the pod"
            )
        return Verdict(family, False, f"{host}:{port} connected, but not to the proxy port")


def verify(ns: Netns, timeout: float = 2.0) -> list[Verdict]:
    """One verdict per address family the pod has."""
    families = sorted({ip.version for ip in pod_addresses(ns)}) or [4]
    sockets = tcp_sockets(ns)
    out = []
    for family in families:
        if not _listening(sockets, family):
            out.append(
                Verdict(family, None, f"nothing listens on {OUTBOUND_CAPTURE_PORT} in the pod")
            )
            continue
        out.append(_probe(ns, family, timeout))
    return out
