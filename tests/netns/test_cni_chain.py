"""The weir-cni bundle (C front end + frozen plugin) chained after bridge + host-local."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from node_agent.cni_events.server import CniEventServer
from node_agent.cni_install.conflist import PluginSettings
from node_agent.cni_install.installer import install_plugin_binary
from node_agent.localmesh.cni_runtime import CniPluginError, invoke_chain
from node_agent.localmesh.topology import CNI_BIN_DIR, POD_IFNAME, LocalTopology
from testbed.cni_fakes import RecordingHandler

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]

# Sits between bridge and weir-cni: records the result bridge handed on, passes it through.
TEE_PLUGIN = f"""#!{sys.executable}
import json, os, sys
conf = json.load(sys.stdin)
if os.environ["CNI_COMMAND"] == "ADD":
    with open({{log!r}}, "a") as log:
        log.write(json.dumps(conf["prevResult"]) + "\\n")
    print(json.dumps(conf["prevResult"]))
"""


@pytest.fixture(scope="module")
def bundle() -> Path:
    """The weir-cni bundle: C front end + frozen Python plugin (rebuilt when its sources change)."""
    subprocess.run(["scripts/build-cni-plugin.sh"], cwd=REPO, check=True, timeout=300)
    return REPO / "build" / "cni-plugin" / "weir-cni"


@pytest.fixture
def chain(bundle):
    """(bin dir with weir-cni installed and the tee, tee log, agent handler, socket, server)."""
    work = Path(tempfile.mkdtemp(prefix="weircni-"))
    try:
        bin_dir = work / "bin"
        bin_dir.mkdir()
        install_plugin_binary(bundle, bin_dir)
        tee_log = work / "tee.jsonl"
        tee = bin_dir / "tee"
        tee.write_text(TEE_PLUGIN.replace("{log!r}", repr(str(tee_log))))
        tee.chmod(0o755)
        handler = RecordingHandler()
        server = CniEventServer(work / "cni.sock", handler)
        server.start()
        try:
            yield bin_dir, tee_log, handler, server
        finally:
            server.stop()
    finally:
        shutil.rmtree(work)


@pytest.fixture
def mesh(chain, topology: LocalTopology):
    """A node whose conflist is bridge, tee, weir-cni; yields (topology, node, handler, ...)."""
    bin_dir, tee_log, handler, server = chain
    topology.cni_path = [CNI_BIN_DIR, bin_dir]
    weir = PluginSettings(agent_socket=str(server.socket_path), agent_timeout_s=5).entry()
    node = topology.add_node(
        "n1", "10.244.1.0/24", "fd00:10:244:1::/64", chained_plugins=[{"type": "tee"}, weir]
    )
    return topology, node, handler, server, tee_log


def test_add_returns_bridge_result_unchanged_and_delivers_the_pod(mesh):
    topology, node, handler, _, tee_log = mesh

    pod = topology.add_pod(node, "web", "shop", dual_stack=True)

    (seen_by_weir,) = [json.loads(line) for line in tee_log.read_text().splitlines()]
    assert pod.cni_result == seen_by_weir
    event = handler.wait_for("add", pod.container_id)
    assert event.pod is not None
    assert (event.pod.namespace, event.pod.name, event.pod.uid) == ("shop", "web", pod.uid)
    assert event.pod.netns == str(pod.netns_path)
    assert event.netns_inode == pod.netns.inode
    assert event.pod.ips == (f"{pod.ipv4}/24", f"{pod.ipv6}/64")
    assert event.pod.ifname == POD_IFNAME


def test_check_follows_capture_and_del_is_delivered_then_idempotent(mesh):
    topology, node, handler, server, _ = mesh
    pod = topology.add_pod(node, "web")
    args = {
        "container_id": pod.container_id,
        "netns_path": pod.netns_path,
        "ifname": POD_IFNAME,
        "cni_path": topology.cni_path,
        "cni_args": pod.cni_args,
        "prev_result": pod.cni_result,
        "netns": node.netns,
    }

    invoke_chain(pod.conflist, "CHECK", **args)
    handler.lose_capture(pod.container_id)
    with pytest.raises(CniPluginError) as err:
        invoke_chain(pod.conflist, "CHECK", **args)
    assert (err.value.plugin, err.value.code) == ("weir-cni", 11)
    assert "capture of default/web is not in place" in err.value.msg

    topology.remove_pod(pod)
    assert handler.wait_for("del", pod.container_id).pod.ips == (f"{pod.ipv4}/24",)
    server.stop()
    # DEL again, agent gone, netns gone: every plugin of the chain still succeeds.
    invoke_chain(pod.conflist, "DEL", **args)


def test_with_the_agent_down_add_fails_closed_and_leaves_nothing(mesh, leftovers):
    topology, node, handler, server, _ = mesh
    server.stop()

    with pytest.raises(CniPluginError) as err:
        topology.add_pod(node, "web")

    assert (err.value.plugin, err.value.code) == ("weir-cni", 11)
    assert "default/web is not started uncaptured" in err.value.msg
    assert not [n for n in leftovers(topology.prefix) if "-pod-" in n]
    # An excluded namespace does not need the agent.
    assert topology.add_pod(node, "coredns", "kube-system").ipv4 is not None
    assert handler.events() == []
