"""Fixtures for tests that build nodes and pods out of network namespaces."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_agent.localmesh.topology import LocalTopology
from node_agent.localmesh.wiring import NETNS_DIR, create_netns, delete_netns, links
from node_agent.netns import Netns
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.pins import BPFFS, PinLayout


def _leftovers(prefix: str) -> list[str]:
    found = [p.name for p in NETNS_DIR.glob(f"{prefix}*")]
    found += [str(p) for p in Path(tempfile.gettempdir()).glob(f"{prefix}*")]
    return sorted(found)


@pytest.fixture
def leftovers() -> Callable[[str], list[str]]:
    """Lists every netns and temp directory whose name starts with a prefix."""
    return _leftovers


@pytest.fixture
def topology() -> Iterator[LocalTopology]:
    """An open LocalTopology (underlay only), closed after the test whatever happened.

    Closing is checked too: a test that leaks a namespace fails here.
    """
    topo = LocalTopology()
    try:
        with topo:
            yield topo
    finally:
        assert _leftovers(topo.prefix) == [], f"topology {topo.prefix} left things behind"


@pytest.fixture
def loopback_netns() -> Iterator[Netns]:
    """A fresh netns with only `lo`, up; deleted after the test whatever happened."""
    name = f"weirtest-lo-{uuid.uuid4().hex[:8]}"
    created = create_netns(name)
    try:
        with links(created) as link:
            link.up("lo")
        yield created
    finally:
        delete_netns(name)


@pytest.fixture
def pins() -> Iterator[PinLayout]:
    """A private eBPF pin root (other tests and agents use their own), always uninstalled."""
    layout = PinLayout(BPFFS / f"weirtest-{uuid.uuid4().hex[:8]}")
    try:
        yield layout
    finally:
        loader.uninstall(layout)
