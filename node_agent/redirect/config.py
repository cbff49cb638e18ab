"""What capture a pod gets: the operator's exclusions, validated and canonical.

Values are sorted and de-duplicated so two configs that mean the same thing
render the same rules, which is what makes re-applying a no-op.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from weir_common.errors import InvalidInputError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Family = Literal[4, 6]
FAMILIES: tuple[Family, ...] = (4, 6)


@dataclass(frozen=True)
class CaptureConfig:
    """Per-pod capture settings. Empty tuples mean "no exclusion"."""

    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    # When non-empty, only these inbound ports are captured (Istio's
    # includeInboundPorts); the rest reach the app directly.
    include_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        for name in ("exclude_outbound_ports", "exclude_inbound_ports", "include_inbound_ports"):
            ports: tuple[int, ...] = getattr(self, name)
            for port in ports:
                _check_port(port, name)
            object.__setattr__(self, name, tuple(sorted(set(ports))))
        cidrs = sorted(set(self.exclude_outbound_cidrs), key=lambda n: (n.version, n))
        object.__setattr__(self, "exclude_outbound_cidrs", tuple(cidrs))

    def outbound_cidrs(self, family: Family) -> tuple[IPNetwork, ...]:
        return tuple(n for n in self.exclude_outbound_cidrs if n.version == family)


def _check_port(port: int, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInputError(f"{what}: {port!r} is not a TCP port (1-65535)")


def parse_ports(values: Iterable[str], what: str) -> tuple[int, ...]:
    """Parse port lists as given on a command line: "22,80" and repeated flags both work."""
    ports: list[int] = []
    for value in values:
        for item in value.split(","):
            text = item.strip()
            if not text.isdigit():
                raise InvalidInputError(f"{what}: {text!r} is not a TCP port (1-65535)")
            port = int(text)
            _check_port(port, what)
            ports.append(port)
    return tuple(ports)


def parse_cidrs(values: Iterable[str], what: str) -> tuple[IPNetwork, ...]:
    """Parse CIDR lists; a bare address means that one host (/32 or /128)."""
    nets: list[IPNetwork] = []
    for value in values:
        for item in value.split(","):
            text = item.strip()
            try:
                nets.append(ipaddress.ip_network(text, strict=True))
            except ValueError as e:
                raise InvalidInputError(f"{what}: {text!r} is not a valid CIDR ({e})") from None
    return tuple(nets)
