"""The node side of kubelet probes under STRICT mTLS: SNAT the node's own connections to pods.

The kubelet probes from the node's host netns, so its connections arrive at
a pod from the node's address on the pod network, and inbound capture sends
them to the proxy, which refuses plaintext under STRICT. In the node's nat
table, WEIR-HOST-PROBES (jumped to from POSTROUTING) SNATs TCP connections
that the node ITSELF originates to an enrolled pod's IP to the probe source
(PROBE_SNAT_IPV4/IPV6); pod capture lets that source through to the app.
`-m owner --socket-exists` matches only packets of a local socket, so traffic
the node forwards between pods never matches. docs/kubernetes.md "Kubelet
probes" has the trust argument.

One rule per enrolled pod IP (rendered by a pure function, pinned by golden
files); the chain is rebuilt whole through `iptables-restore --noflush` in
the backend the node's other rules (kube-proxy's) use. `HostProbes` keeps the
enrolled set in memory, keyed by pod UID, and writes it on every change;
`converge()` writes it once more, so rules an earlier agent left for pods no
longer enrolled go away. `remove_host_probes` takes everything out (uninstall).
Only WEIR-HOST-PROBES and the jumps to it are ever read or written: other
Weir chains in the same netns are left alone.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from node_agent.constants import RULE_COMMENT_PREFIX
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend, require_tools
from node_agent.redirect.config import FAMILIES, Family
from node_agent.redirect.iptables import Ruleset, converge, other_backend, read_owned
from node_agent.redirect.iptables_model import OwnedTable
from node_agent.redirect.iptables_plan import differences
from node_agent.redirect.iptables_rules import NAT, PROBE_SOURCES
from weir_common.errors import InvalidInputError, WeirError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HOST_PROBES_CHAIN: Final = "WEIR-HOST-PROBES"
_JUMP: Final = (
    "POSTROUTING",
    f'-p tcp -m owner --socket-exists -m comment --comment "{RULE_COMMENT_PREFIX}'
    f'host probes: TCP the node itself opens" -j {HOST_PROBES_CHAIN}',
)


def _snat(ip: IPAddress) -> str:
    source = PROBE_SOURCES[4 if ip.version == 4 else 6]
    return (
        f"-d {ip}/{ip.max_prefixlen} -m comment --comment "
        f'"{RULE_COMMENT_PREFIX}host probes: enrolled pod {ip} sees the node as {source}" '
        f"-j SNAT --to-source {source}"
    )


def host_probe_rules(pod_ips: Iterable[IPAddress], family: Family) -> dict[str, OwnedTable]:
    """WEIR-HOST-PROBES for one family: one SNAT per enrolled pod IP, sorted, no duplicates.

    The chain and its jump are there even with no pod enrolled, so the node
    shows the same rules whenever an agent runs on it.
    """
    ips = sorted({ip for ip in pod_ips if ip.version == family}, key=int)
    table = OwnedTable(chains={HOST_PROBES_CHAIN: tuple(_snat(ip) for ip in ips)}, jumps=(_JUMP,))
    return {NAT: table}


def ours(owned: Ruleset) -> Ruleset:
    """The part of Weir's rules in a netns that is the host probes'."""
    nat = owned.get(NAT)
    if nat is None:
        return {}
    table = OwnedTable(
        chains={c: r for c, r in nat.chains.items() if c == HOST_PROBES_CHAIN},
        jumps=tuple(j for j in nat.jumps if j[1].endswith(f"-j {HOST_PROBES_CHAIN}")),
    )
    return {} if table.empty else {NAT: table}


def pod_ips(ips: Iterable[str]) -> tuple[IPAddress, ...]:
    """Pod IPs as CNI reports them ("10.244.1.5/24" or a bare address)."""
    out: list[IPAddress] = []
    for text in ips:
        try:
            out.append(ipaddress.ip_interface(text).ip)
        except ValueError:
            raise InvalidInputError(f"pod IP {text!r} is not an IP address") from None
    return tuple(out)


def own_netns() -> Netns:
    """The netns of the agent process (its main thread's): the node's host netns."""
    path = Path("/proc/self/ns/net")
    return Netns(path, path.stat().st_ino)


class HostProbes:
    """WEIR-HOST-PROBES in the node's netns, following the enrolled pods. Thread-safe."""

    def __init__(self, backend: Backend, netns: Netns | None = None) -> None:
        require_tools(backend)
        self.backend = backend
        self._other = other_backend(backend)
        self._ns = netns or own_netns()
        self._pods: dict[str, tuple[IPAddress, ...]] = {}
        # Enrollments of different pods run in parallel threads; each write
        # renders the whole chain, so writes must not interleave.
        self._lock = threading.Lock()

    def _desired(self, pods: Mapping[str, tuple[IPAddress, ...]]) -> dict[Family, Ruleset]:
        every = [ip for ips in pods.values() for ip in ips]
        return {family: host_probe_rules(every, family) for family in FAMILIES}

    def _write(self, pods: Mapping[str, tuple[IPAddress, ...]]) -> None:
        converge(self._ns, self.backend, self._desired(pods), ours)
        if self._other is not None and any(
            ours(read_owned(self._ns, family, self._other)) for family in FAMILIES
        ):
            # Left by an agent that followed the other backend: both would run.
            empty: dict[Family, Ruleset] = {family: {} for family in FAMILIES}
            converge(self._ns, self._other, empty, ours)
            log.warning("removed stale host probe rules from iptables-%s", self._other)

    def add(self, uid: str, ips: Iterable[str]) -> None:
        """SNAT the node's connections to the pod's IPs; on failure nothing changed.

        A pod already added with the same IPs writes nothing (the agent re-adds
        every pod when it converges); `converge` is what repairs the kernel.
        """
        addresses = pod_ips(ips)
        with self._lock:
            if self._pods.get(uid) == addresses:
                return
            pods = {**self._pods, uid: addresses}
            self._write(pods)
            self._pods = pods

    def remove(self, uid: str) -> None:
        """Stop SNATing to the pod's IPs; forgotten at once, so a failed write is redone later."""
        with self._lock:
            if self._pods.pop(uid, None) is not None:
                self._write(self._pods)

    def converge(self) -> None:
        """Make the node's rules exactly the pods added here (rules of departed pods go)."""
        with self._lock:
            self._write(self._pods)

    def check(self) -> list[str]:
        """Drift between the rules the enrolled pods need and the node's; empty when none."""
        with self._lock:
            desired = self._desired(self._pods)
        return [
            f"IPv{family} {line}"
            for family in FAMILIES
            for line in differences(
                desired[family], ours(read_owned(self._ns, family, self.backend))
            )
        ]


def remove_host_probes(netns: Netns | None = None) -> bool:
    """Remove WEIR-HOST-PROBES and its jumps from every usable backend; whether any was there."""
    ns = netns or own_netns()
    empty: dict[Family, Ruleset] = {family: {} for family in FAMILIES}
    removed = False
    for backend in Backend:
        try:
            require_tools(backend)
        except WeirError:
            continue
        removed |= any(converge(ns, backend, empty, ours).values())
    return removed
