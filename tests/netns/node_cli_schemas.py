"""The JSON shapes `weir node ... -o json` promises, and a small checker for them.

A schema is a Python value: a type (str, int, bool, float for any number),
`Opt(schema)` for "this or null", `OneOf(*values)`, `[schema]` for a list of
it, `{"*": schema}` for a map with any keys, or a dict of exactly these keys.
Written by hand so the tests need no new dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Opt:
    schema: Any


class OneOf:
    def __init__(self, *values: Any) -> None:
        self.values = values


def errors(value: Any, schema: Any, path: str = "$") -> list[str]:
    """Every place `value` departs from `schema`; empty when it conforms."""
    if isinstance(schema, Opt):
        return [] if value is None else errors(value, schema.schema, path)
    if isinstance(schema, OneOf):
        return [] if value in schema.values else [f"{path}: {value!r} not one of {schema.values}"]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in errors(item, schema[0], f"{path}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        if set(schema) == {"*"}:
            return [e for k, v in value.items() for e in errors(v, schema["*"], f"{path}.{k}")]
        found = [f"{path}: missing {k!r}" for k in schema if k not in value]
        found += [f"{path}: unexpected {k!r}" for k in value if k not in schema]
        return found + [
            e
            for k, sub in schema.items()
            if k in value
            for e in errors(value[k], sub, f"{path}.{k}")
        ]
    if schema is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif schema is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, schema)
    return [] if ok else [f"{path}: expected {schema.__name__}, got {value!r}"]


PROBLEMS = [str]
CERTIFICATE = {
    "identity": str,
    "serial": str,
    "not_before": str,
    "not_after": str,
    "renewal_due": str,
    "expires_in_seconds": int,
    "pods": int,
}
STATUS = {
    "node": str,
    "agent": {"version": str, "pid": int, "ready": bool},
    "redirect": {"mode": OneOf("iptables-nft", "iptables-legacy", "ebpf")},
    "controlplane": {
        "target": str,
        "connected": bool,
        "not_connected": Opt(str),
        "resources": {"*": int},
        "last_nack": Opt({"type": str, "nonce": str, "reason": str, "at": str}),
    },
    "pods": {"seen": int, "captured": int},
    "proxy": {
        "reachable": bool,
        "ready": bool,
        "version": str,
        "pods_served": int,
        "connections": int,
    },
    "certificates": {"count": int, "earliest_expiry": Opt(str)},
    "problems": PROBLEMS,
}
WORKLOADS = {
    "workloads": [
        {
            "pod": str,
            "uid": str,
            "ips": [str],
            "mode": str,
            "status": str,
            "capture_in_kernel": bool,
            "served_by_proxy": bool,
            "identity": Opt(str),
        }
    ],
    "problems": PROBLEMS,
}
CERTS = {"certificates": [CERTIFICATE], "problems": PROBLEMS}
ENDPOINT = {"addr": str, "workload": Opt(str), "identity": Opt(str)}
CONNECTIONS = {
    "connections": [
        {
            "direction": OneOf("inbound", "outbound"),
            "src": ENDPOINT,
            "dst": {**ENDPOINT, "service": Opt(str)},
            "security_policy": OneOf("mutual_tls", "none"),
            "bytes_up": int,
            "bytes_down": int,
            "age_seconds": float,
        }
    ],
    "problems": PROBLEMS,
}
POD = {
    "pod": str,
    "found": bool,
    "uid": str,
    "ips": [str],
    "netns": str,
    "agent_status": str,
    "capture": {"mode": str, "as_expected": bool, "diff": [str]},
    "listeners": {"expected": [int], "present": [int], "missing": [int]},
    "proxy": {"served": bool, "identity": Opt(str)},
    "certificate": Opt(CERTIFICATE),
    "problems": PROBLEMS,
}
TRACE = {
    "source": {
        "pod": str,
        "node": str,
        "ips": [str],
        "identity": str,
        "captured": Opt(bool),
        "capture": str,
    },
    "dialed": str,
    "service": Opt(str),
    "route": OneOf("mesh", "passthrough"),
    "why": str,
    "endpoints": [
        {
            "workload": str,
            "address": str,
            "node": str,
            "identity": str,
            "mtls": bool,
            "allowed": Opt(bool),
            "reason": str,
        }
    ],
    "problems": PROBLEMS,
}
SERVICES = {
    "services": [
        {
            "service": str,
            "vips": [str],
            "ports": [{"port": int, "target_port": int}],
            "endpoints": [{"workload": str, "node": str, "ips": [str]}],
        }
    ],
    "problems": PROBLEMS,
}
POLICIES = {
    "policies": [
        {
            "policy": str,
            "action": OneOf("ALLOW", "DENY"),
            "selector": {"*": str},
            "selects": [str],
            "rules": [
                {
                    "source_principals": [str],
                    "source_namespaces": [str],
                    "source_ip_blocks": [str],
                    "destination_ports": [int],
                }
            ],
        }
    ],
    "problems": PROBLEMS,
}
VERIFY = {
    "node": Opt(str),
    "mode": Opt(str),
    "checks": [{"name": str, "ok": bool, "detail": str}],
    "problems": PROBLEMS,
}
LOGS = {
    "records": [
        {
            "time": str,
            "component": OneOf("agent", "proxy", "cni"),
            "level": str,
            "logger": str,
            "message": str,
        }
    ],
    "sources": {"*": str},
    "problems": PROBLEMS,
}
GRAPH = {
    "node": str,
    "picture": Opt(str),
    "edges": [
        {
            "source": str,
            "destination": str,
            "security": OneOf("mutual_tls", "plaintext", "failed"),
            "source_identity": str,
            "destination_identity": str,
            "opened": int,
            "failed": int,
            "live": int,
        }
    ],
    "problems": PROBLEMS,
}
