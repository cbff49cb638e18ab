"""Per-pod capture annotations -> CaptureConfig, and the errors that name the annotation."""

from __future__ import annotations

import ipaddress

import pytest

from node_agent.kubernetes.annotations import (
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
    capture_config,
)
from node_agent.redirect.config import CaptureConfig
from weir_common.errors import InvalidInputError


def test_no_annotations_is_the_base() -> None:
    base = CaptureConfig(exclude_outbound_ports=(22,))
    assert capture_config({"other": "x"}, base) == base


def test_every_annotation_is_read_and_added_to_the_base() -> None:
    config = capture_config(
        {
            EXCLUDE_OUTBOUND_PORTS: "443, 80",
            EXCLUDE_OUTBOUND_CIDRS: "10.0.0.0/8,fd00::/8, 192.168.1.1",
            EXCLUDE_INBOUND_PORTS: "9090",
            INCLUDE_INBOUND_PORTS: "8080,8443",
        },
        CaptureConfig(exclude_outbound_ports=(22,)),
    )
    assert config == CaptureConfig(
        exclude_outbound_ports=(22, 80, 443),
        exclude_inbound_ports=(9090,),
        include_inbound_ports=(8080, 8443),
        exclude_outbound_cidrs=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.168.1.1/32"),
            ipaddress.ip_network("fd00::/8"),
        ),
    )


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (EXCLUDE_OUTBOUND_PORTS, "http", "'http' is not a TCP port"),
        (EXCLUDE_OUTBOUND_PORTS, "80,", "'' is not a TCP port"),
        (EXCLUDE_INBOUND_PORTS, "70000", "70000 is not a TCP port"),
        (INCLUDE_INBOUND_PORTS, "0", "0 is not a TCP port"),
        (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.1/8", "'10.0.0.1/8' is not a valid CIDR"),
        (EXCLUDE_OUTBOUND_CIDRS, "  ", "empty value"),
    ],
)
def test_a_bad_value_names_the_annotation_and_why(name: str, value: str, reason: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        capture_config({name: value}, CaptureConfig())
    assert raised.value.message.startswith(f"annotation {name}: ")
    assert reason in raised.value.message
