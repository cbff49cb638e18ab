"""Choosing between iptables-nft and iptables-legacy."""

from __future__ import annotations

import pytest

from node_agent.redirect.backend import Backend, choose_backend
from weir_common.errors import NodeSetupError

NFT, LEGACY = Backend.NFT, Backend.LEGACY


@pytest.mark.parametrize(
    ("override", "counts", "expected", "reason"),
    [
        (LEGACY, {NFT: 40, LEGACY: 0}, LEGACY, "requested explicitly"),
        (NFT, {NFT: 0, LEGACY: 40}, NFT, "requested explicitly"),
        (None, {NFT: 0, LEGACY: 12}, LEGACY, "the host's rules are in iptables-legacy (12 rules)"),
        (None, {NFT: 7, LEGACY: 0}, NFT, "the host's rules are in iptables-nft (7 rules)"),
        (None, {NFT: 3, LEGACY: 30}, LEGACY, "both backends hold host rules (nft 3, legacy 30)"),
        (None, {NFT: 30, LEGACY: 30}, NFT, "both backends hold host rules"),
        (None, {NFT: 0, LEGACY: 0}, NFT, "no host rules in either backend; defaulting to nft"),
        (None, {NFT: None, LEGACY: 0}, LEGACY, "defaulting to legacy"),
        (None, {NFT: None, LEGACY: 5}, LEGACY, "iptables-legacy (5 rules)"),
    ],
)
def test_choice(override, counts, expected, reason):
    choice = choose_backend(override, counts)
    assert choice.backend == expected
    assert reason in choice.reason


def test_an_unusable_override_is_an_error_not_a_fallback():
    with pytest.raises(NodeSetupError, match="iptables backend legacy was requested but is not"):
        choose_backend(LEGACY, {NFT: 10, LEGACY: None})


def test_no_backend_at_all():
    with pytest.raises(NodeSetupError, match="no usable iptables backend"):
        choose_backend(None, {NFT: None, LEGACY: None})
