"""weir-cni under a real runtime: containerd runs containers through `ctr run --cni`."""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from node_agent.cni_events.server import CniEventServer
from node_agent.cni_install import cli
from node_agent.localmesh.topology import CNI_BIN_DIR
from testbed.cni_fakes import RecordingHandler
from weir_common.errors import InvalidInputError

pytestmark = pytest.mark.netns

# Prints what the container itself sees: its netns and its address on eth0.
REPORT = "echo started; readlink /proc/self/ns/net; ip -o -4 addr show eth0"


def weir_cni(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="weir")
    cli.register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(args)
    return int(parsed.func(parsed))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def cni_dirs(node, plugin_bundle):
    """A conf dir holding the node's network as a single bridge .conf, a bin dir, an agent."""
    work = Path(tempfile.mkdtemp(prefix="weire2e-"))
    conf_dir, bin_dir = work / "net.d", work / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    for plugin in ("bridge", "host-local", "loopback"):
        (bin_dir / plugin).symlink_to(CNI_BIN_DIR / plugin)
    (conf_dir / "10-e2e.conf").write_text(
        "{\n"
        '  "cniVersion": "1.0.0",\n'
        '  "name": "e2e",\n'
        '  "type": "bridge",\n'
        f'  "bridge": "{node.bridge}",\n'
        '  "isGateway": true,\n'
        '  "ipam": {\n'
        '    "type": "host-local",\n'
        f'    "dataDir": "{work}/ipam",\n'
        f'    "ranges": [[{{"subnet": "{node.pod_cidr_v4}"}}]]\n'
        "  }\n"
        "}\n"
    )
    handler = RecordingHandler()
    server = CniEventServer(work / "agent.sock", handler)
    server.start()
    try:
        yield conf_dir, bin_dir, handler, server
    finally:
        server.stop()
        shutil.rmtree(work)


def install(conf_dir: Path, bin_dir: Path, bundle: Path, server: CniEventServer) -> None:
    dirs = ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir)]
    assert (
        weir_cni(
            [
                *("cni", "install", *dirs, "--plugin-bundle", str(bundle)),
                *("--agent-socket", str(server.socket_path), "--wait-timeout", "10"),
            ]
        )
        == 0
    )


def test_containers_are_delivered_with_their_netns_and_ips_and_deleted(
    containerd, node, cni_dirs, plugin_bundle
):
    conf_dir, bin_dir, handler, server = cni_dirs
    before = snapshot(conf_dir)
    install(conf_dir, bin_dir, plugin_bundle, server)
    assert sorted(snapshot(conf_dir)) == ["10-e2e.conflist"]

    seen_ips = set()
    for name in ("c1", "c2"):
        proc = containerd.run(node, name, REPORT, conf_dir=conf_dir, bin_dir=bin_dir)
        assert proc.returncode == 0, proc.stderr
        container_id = f"{containerd.namespace}-{name}"
        added = handler.wait_for("add", container_id)
        assert added.pod is not None
        netns_inode = re.search(r"net:\[(\d+)\]", proc.stdout)
        address = re.search(r"inet (\S+)", proc.stdout)
        assert netns_inode and address, proc.stdout
        assert added.netns_inode == int(netns_inode.group(1))  # the container's own netns
        assert added.pod.ips == (address.group(1),)
        assert added.pod.netns.startswith("/proc/")
        seen_ips.add(address.group(1))
        # ctr removes the container once it exits: the runtime's DEL reaches the agent.
        deleted = handler.wait_for("del", container_id)
        assert deleted.pod is not None
        assert deleted.pod.ips == added.pod.ips
    assert len(seen_ips) == 2
    assert handler.captured() == set()

    dirs = ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir)]
    assert weir_cni(["cni", "uninstall", *dirs]) == 0
    assert snapshot(conf_dir) == before
    assert sorted(p.name for p in bin_dir.iterdir()) == ["bridge", "host-local", "loopback"]


@pytest.mark.parametrize("agent_state", ["down", "refusing"])
def test_a_container_does_not_start_unless_the_agent_captures_it(
    containerd, node, cni_dirs, plugin_bundle, agent_state
):
    conf_dir, bin_dir, handler, server = cni_dirs
    install(conf_dir, bin_dir, plugin_bundle, server)
    if agent_state == "down":
        server.stop()
        expected = "weir node agent unreachable"
    else:
        handler.refuse = InvalidInputError("pod is not allowed in the mesh")
        expected = "could not capture container"

    name = f"fail-{agent_state}"
    try:
        proc = containerd.run(node, name, REPORT, conf_dir=conf_dir, bin_dir=bin_dir)

        assert proc.returncode != 0
        assert expected in proc.stderr, proc.stderr
        assert "started" not in proc.stdout  # the container's process never ran
        # ctr cannot delete a task that never started; it stays CREATED, never RUNNING.
        (task,) = [t for t in containerd.ctr("task", "list").stdout.splitlines() if name in t]
        assert task.split()[-1] == "CREATED"
        assert handler.captured() == set()
    finally:
        containerd.ctr("task", "delete", "--force", name)
        containerd.ctr("containers", "delete", name)
