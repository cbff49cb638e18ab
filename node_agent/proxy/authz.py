"""L4 authorization, decided by the destination's node proxy.

DENY policies first: any match refuses. Then, if no ALLOW policy selects the
destination, the connection is allowed; if some do, one of their rules must
match. A plaintext connection has no identity, so rules that name principals
or namespaces never match it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from node_agent.proxy.model import Action, AuthorizationPolicy, MeshSnapshot, Rule, Workload
from weir_common.mesh import SpiffeId


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # Why, for the access log: "deny:<ns/name>", "allow:<ns/name>", "no-allow-policy",
    # "no-allow-match".
    reason: str


@dataclass(frozen=True)
class Request:
    source: SpiffeId | None  # None: plaintext, unauthenticated
    source_ip: str
    destination: Workload
    destination_port: int


_NO_ALLOW_POLICY: Final = Decision(allowed=True, reason="no-allow-policy")


def authorize(snapshot: MeshSnapshot, request: Request) -> Decision:
    policies = snapshot.policies_for(request.destination)
    if not policies:
        return _NO_ALLOW_POLICY
    for policy in policies:
        if policy.action is Action.DENY and _matches(policy, request):
            return Decision(allowed=False, reason=f"deny:{policy.key}")
    allows = [p for p in policies if p.action is Action.ALLOW]
    if not allows:
        return _NO_ALLOW_POLICY
    for policy in allows:
        if _matches(policy, request):
            return Decision(allowed=True, reason=f"allow:{policy.key}")
    return Decision(allowed=False, reason="no-allow-match")


def _matches(policy: AuthorizationPolicy, request: Request) -> bool:
    return any(_rule_matches(rule, request) for rule in policy.rules)


def _rule_matches(rule: Rule, request: Request) -> bool:
    if rule.source_principals and (
        request.source is None or str(request.source) not in rule.source_principals
    ):
        return False
    if rule.source_namespaces and (
        request.source is None or request.source.namespace not in rule.source_namespaces
    ):
        return False
    if rule.source_networks:
        address = ipaddress.ip_address(request.source_ip)
        if not any(address in network for network in rule.source_networks):
            return False
    return not rule.destination_ports or request.destination_port in rule.destination_ports
