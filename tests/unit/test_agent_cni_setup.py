"""The agent keeps weir-cni in the node's chain and is not ready until it is."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from node_agent.agent.cni_setup import CniSetup, CniSetupSettings
from node_agent.cni_install.conflist import PluginSettings

PRIMARY = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}],
}


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def plugin_types(conf: Path) -> list[str]:
    return [p["type"] for p in json.loads(conf.read_text())["plugins"]]


@pytest.fixture
def setup(tmp_path: Path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "weir-cni").write_text("#!/bin/sh\n")
    (bundle / "weir-cni").chmod(0o755)
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    cni = CniSetup(
        CniSetupSettings(
            conf_dir=conf_dir,
            bin_dir=bin_dir,
            bundle=bundle,
            plugin=PluginSettings(agent_socket="/run/weir/cni.sock"),
            wait_s=0.5,
        )
    )
    cni.start()
    try:
        yield cni, conf_dir, bin_dir
    finally:
        cni.stop()


def test_not_ready_until_the_primary_config_appears_then_installed(setup):
    cni, conf_dir, bin_dir = setup
    wait_until(lambda: "no CNI network config" in (cni.not_ready() or ""))
    assert "weir-cni not installed in" in cni.not_ready()
    conf = conf_dir / "10-calico.conflist"
    conf.write_text(json.dumps(PRIMARY))
    wait_until(lambda: cni.not_ready() is None)
    assert plugin_types(conf) == ["bridge", "weir-cni"]
    assert (bin_dir / "weir-cni").is_symlink()


def test_a_rewrite_by_the_primary_cni_gets_our_entry_back_and_stop_keeps_it(setup):
    cni, conf_dir, _ = setup
    conf = conf_dir / "10-calico.conflist"
    conf.write_text(json.dumps(PRIMARY))
    wait_until(lambda: cni.not_ready() is None)
    conf.write_text(json.dumps(PRIMARY))
    wait_until(lambda: plugin_types(conf) == ["bridge", "weir-cni"], timeout=2)
    cni.stop()
    # A restart or an upgrade must not let pods start outside the mesh.
    assert plugin_types(conf) == ["bridge", "weir-cni"]
