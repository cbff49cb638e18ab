"""Per-pod capture exclusions, read from the pod's annotations (docs/kubernetes.md).

The values have the syntax of the matching `weir redirect` flags
(comma-separated ports or CIDRs). A value that does not parse is an error
naming the annotation; nothing of the pod's capture is applied then.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from node_agent.redirect.config import CaptureConfig, parse_cidrs, parse_ports
from weir_common.errors import InvalidInputError

EXCLUDE_OUTBOUND_PORTS: Final = "weir.dev/exclude-outbound-ports"
EXCLUDE_OUTBOUND_CIDRS: Final = "weir.dev/exclude-outbound-cidrs"
EXCLUDE_INBOUND_PORTS: Final = "weir.dev/exclude-inbound-ports"
INCLUDE_INBOUND_PORTS: Final = "weir.dev/include-inbound-ports"
CAPTURE_ANNOTATIONS: Final = (
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_INBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
)


def capture_config(annotations: Mapping[str, str], base: CaptureConfig) -> CaptureConfig:
    """`base` (what the mesh config says) with the pod's annotated exclusions added.

    Raises InvalidInputError naming the first annotation that does not parse.
    An empty value is refused too: it is more likely a templating slip than
    a wish for no exclusion, and the annotation can simply be left out.
    """
    values = {name: annotations.get(name) for name in CAPTURE_ANNOTATIONS}
    for name, value in values.items():
        if value is not None and not value.strip():
            raise InvalidInputError(f"annotation {name}: empty value")

    def ports(name: str) -> tuple[int, ...]:
        value = values[name]
        return () if value is None else parse_ports([value], f"annotation {name}")

    cidr_value = values[EXCLUDE_OUTBOUND_CIDRS]
    cidrs = (
        ()
        if cidr_value is None
        else parse_cidrs([cidr_value], f"annotation {EXCLUDE_OUTBOUND_CIDRS}")
    )
    return CaptureConfig(
        exclude_outbound_ports=base.exclude_outbound_ports + ports(EXCLUDE_OUTBOUND_PORTS),
        exclude_inbound_ports=base.exclude_inbound_ports + ports(EXCLUDE_INBOUND_PORTS),
        include_inbound_ports=base.include_inbound_ports + ports(INCLUDE_INBOUND_PORTS),
        exclude_outbound_cidrs=base.exclude_outbound_cidrs + cidrs,
    )
