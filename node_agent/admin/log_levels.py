"""Log levels per component, read and changed at runtime through /logging.

A component is a short name for a logger subtree ("enrollment" is
`node_agent.enrollment` and everything under it), so an operator can turn
one part up to debug at 3 a.m. without a restart and without drowning in the
rest. Only the components a process registers can be changed: a typo is an
error, never a new logger that silently does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from weir_common.errors import InvalidInputError

LEVELS: Final = ("debug", "info", "warning", "error", "critical")

# Component -> logger name; "" is the root logger (every component not set on its own).
AGENT_COMPONENTS: Final = {
    "root": "",
    "agent": "node_agent.agent",
    "enrollment": "node_agent.enrollment",
    "redirect": "node_agent.redirect",
    "cni": "node_agent.cni_events",
    "handoff": "node_agent.proxy_handoff",
    "xds": "node_agent.controlplane_client",
    "admin": "weir_common.http_endpoint",
}
PROXY_COMPONENTS: Final = {
    "root": "",
    "proxy": "node_agent.proxy",
    "inbound": "node_agent.proxy.inbound",
    "outbound": "node_agent.proxy.outbound",
    "identity": "node_agent.proxy.identity",
    "handoff": "node_agent.proxy_handoff",
    "xds": "node_agent.controlplane_client",
    "admin": "weir_common.http_endpoint",
}


def levels(components: Mapping[str, str]) -> dict[str, str]:
    """The level in force per component (inherited from a parent when not set on its own)."""
    return {
        name: logging.getLevelName(logging.getLogger(logger).getEffectiveLevel()).lower()
        for name, logger in sorted(components.items())
    }


def set_levels(components: Mapping[str, str], changes: Mapping[str, str]) -> None:
    """Apply `changes` (component -> level) all or nothing: one bad name changes none."""
    for name, level in changes.items():
        if name not in components:
            raise InvalidInputError(
                f"no component {name!r} (one of: {', '.join(sorted(components))})"
            )
        if level.lower() not in LEVELS:
            raise InvalidInputError(f"{name}: {level!r} is not one of {', '.join(LEVELS)}")
    for name, level in changes.items():
        logging.getLogger(components[name]).setLevel(level.upper())
