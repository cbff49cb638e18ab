"""The capture rules for one pod, as a pure function of its config.

Only the nat table is used: REDIRECT rewrites the destination to the proxy's
port inside the pod netns and conntrack keeps the original for
SO_ORIGINAL_DST. Exemptions come first so that the proxy's own sockets (UID
or GID 1337, or the mark) and loopback are never looped back into it.
Inbound connections from the probe source are not captured: only the node
can complete a connection from it (host_probes.py, docs/kubernetes.md
"Kubelet probes").
"""

from __future__ import annotations

import ipaddress
from typing import Final

from node_agent.constants import (
    INBOUND_PLAINTEXT_CAPTURE_PORT,
    INBOUND_TUNNEL_PORT,
    OUTBOUND_CAPTURE_PORT,
    PROBE_SNAT_IPV4,
    PROBE_SNAT_IPV6,
    PROXY_GID,
    PROXY_MARK,
    PROXY_MARK_MASK,
    PROXY_UID,
    RULE_COMMENT_PREFIX,
)
from node_agent.redirect.config import CaptureConfig, Family
from node_agent.redirect.iptables_model import OwnedTable

NAT = "nat"
OUTBOUND_CHAIN = "WEIR-OUTBOUND"
INBOUND_CHAIN = "WEIR-INBOUND"
# The source the node gives its own connections to enrolled pods (host_probes.py).
PROBE_SOURCES: Final[dict[Family, ipaddress.IPv4Address | ipaddress.IPv6Address]] = {
    4: ipaddress.IPv4Address(PROBE_SNAT_IPV4),
    6: ipaddress.IPv6Address(PROBE_SNAT_IPV6),
}


def _rule(match: str, purpose: str, target: str) -> str:
    # Written exactly as iptables-save prints it, so rules read back compare
    # equal to rendered ones. iptables-save escapes quotes and apostrophes,
    # so purposes must contain neither (the apply/check round-trip test holds us to it).
    comment = f'-m comment --comment "{RULE_COMMENT_PREFIX}{purpose}"'
    return " ".join(part for part in (match, comment, target) if part)


def _outbound(config: CaptureConfig, family: Family) -> tuple[str, ...]:
    rules = [
        _rule("-o lo", "outbound: loopback stays inside the pod", "-j RETURN"),
        _rule(
            f"-m owner --uid-owner {PROXY_UID}",
            f"outbound: traffic of the proxy (uid {PROXY_UID})",
            "-j RETURN",
        ),
        _rule(
            f"-m owner --gid-owner {PROXY_GID}",
            f"outbound: traffic of the proxy (gid {PROXY_GID})",
            "-j RETURN",
        ),
        _rule(
            f"-m mark --mark {PROXY_MARK:#x}/{PROXY_MARK_MASK:#x}",
            "outbound: sockets marked by the proxy",
            "-j RETURN",
        ),
    ]
    rules += [
        _rule(f"-p tcp -m tcp --dport {p}", f"outbound: excluded port {p}", "-j RETURN")
        for p in config.exclude_outbound_ports
    ]
    rules += [
        _rule(f"-d {net}", f"outbound: excluded CIDR {net}", "-j RETURN")
        for net in config.outbound_cidrs(family)
    ]
    rules.append(
        _rule(
            "-p tcp",
            f"outbound: redirect to the proxy ({OUTBOUND_CAPTURE_PORT})",
            f"-j REDIRECT --to-ports {OUTBOUND_CAPTURE_PORT}",
        )
    )
    return tuple(rules)


def _inbound(config: CaptureConfig, family: Family) -> tuple[str, ...]:
    redirect = f"-j REDIRECT --to-ports {INBOUND_PLAINTEXT_CAPTURE_PORT}"
    probe = PROBE_SOURCES[family]
    rules = [
        _rule(
            f"-p tcp -m tcp --dport {INBOUND_TUNNEL_PORT}",
            f"inbound: mTLS tunnel port {INBOUND_TUNNEL_PORT} belongs to the proxy",
            "-j RETURN",
        ),
        # Before every port rule: a probe reaches whatever port it targets.
        _rule(
            f"-s {probe}/{probe.max_prefixlen}",
            f"inbound: kubelet probes, SNATed to {probe} by the node",
            "-j RETURN",
        ),
    ]
    rules += [
        _rule(f"-p tcp -m tcp --dport {p}", f"inbound: excluded port {p}", "-j RETURN")
        for p in config.exclude_inbound_ports
    ]
    if config.include_inbound_ports:
        rules += [
            _rule(
                f"-p tcp -m tcp --dport {p}",
                f"inbound: included port {p} to the proxy ({INBOUND_PLAINTEXT_CAPTURE_PORT})",
                redirect,
            )
            for p in config.include_inbound_ports
        ]
    else:
        rules.append(
            _rule(
                "-p tcp",
                f"inbound: redirect to the proxy ({INBOUND_PLAINTEXT_CAPTURE_PORT})",
                redirect,
            )
        )
    return tuple(rules)


def capture_rules(config: CaptureConfig, family: Family) -> dict[str, OwnedTable]:
    """Everything Weir installs in a pod netns for one IP family, per table."""
    nat = OwnedTable(
        chains={OUTBOUND_CHAIN: _outbound(config, family), INBOUND_CHAIN: _inbound(config, family)},
        jumps=(
            (
                "PREROUTING",
                _rule("-p tcp", "inbound: capture TCP to the pod", f"-j {INBOUND_CHAIN}"),
            ),
            (
                "OUTPUT",
                _rule("-p tcp", "outbound: capture TCP from the pod", f"-j {OUTBOUND_CHAIN}"),
            ),
        ),
    )
    return {NAT: nat}
