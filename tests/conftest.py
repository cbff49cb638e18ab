"""Suite-wide rules: kernel tests never skip, and golden files have one home."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_agent.netns import Netns

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDENS = os.environ.get("WEIR_UPDATE_GOLDENS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A skipped kernel test "just appears to pass": without root, fail loudly instead.
    if os.geteuid() == 0:
        return
    for item in items:
        if item.get_closest_marker("netns"):
            item.add_marker(pytest.mark.usefixtures("_require_root"))


@pytest.fixture
def _require_root() -> None:
    pytest.fail("this test creates network namespaces and must run as root (make test does)")


@pytest.fixture
def golden() -> Callable[[str, str], None]:
    """Compare text with tests/golden/<name>; WEIR_UPDATE_GOLDENS=1 rewrites it (`make goldens`)."""

    def check(name: str, actual: str) -> None:
        path = GOLDEN_DIR / name
        if UPDATE_GOLDENS:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual)
            return
        assert path.exists(), f"golden file {path} missing: run `make goldens` and review it"
        assert actual == path.read_text(), f"{name} differs from its golden file"

    return check


@pytest.fixture
def bare_netns() -> Iterator[Netns]:
    """An empty network namespace of this test's own, always removed afterwards."""
    name = f"weirt-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Netns.validate(f"/var/run/netns/{name}")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
