"""Containers started by containerd (`ctr run --cni`) reach each other through the mesh.

The whole local mesh runs for real (control plane, agents, proxies as UID
1337); containerd runs each container with the node's conflist (bridge,
host-local, weir-cni) from inside the node's netns. Without Kubernetes, ctr
passes no pod name: the agent identifies a container by its CNI container id
`<containerd namespace>-<container name>`, so the containers run in
containerd namespace "default" under the names mesh.yaml gives them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.cni_install.installer import install_plugin_binary
from node_agent.demo.mesh import access_log, wait_for_access_log
from node_agent.localmesh.mesh import REPO, LocalMesh, MeshNode, http_get, real_proxy
from node_agent.localmesh.topology import CNI_BIN_DIR

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

CONFIG = REPO / "examples" / "mesh.yaml"


@pytest.fixture
def runtime(containerd, plugin_bundle):
    """containerd namespace "default" with the test image, plus a CNI bin dir with weir-cni."""
    default = dataclasses.replace(containerd, namespace="default")
    imported = default.ctr("images", "import", str(containerd.work / "image.tar"))
    assert imported.returncode == 0, imported.stderr
    bin_dir = Path(tempfile.mkdtemp(prefix="weire2e-bin-"))
    for plugin in ("bridge", "host-local", "loopback"):
        (bin_dir / plugin).symlink_to(CNI_BIN_DIR / plugin)
    install_plugin_binary(plugin_bundle, bin_dir)
    try:
        yield default, bin_dir
    finally:
        shutil.rmtree(bin_dir)


@pytest.fixture
def mesh() -> Iterator[LocalMesh]:
    with LocalMesh(CONFIG, real_proxy) as local:
        local.add_node("node-1", "10.244.1.0/24")
        local.add_node("node-2", "10.244.2.0/24")
        yield local


def conf_dir_for(local: LocalMesh, node: MeshNode) -> Path:
    conf = node.dir / "net.d"
    conf.mkdir()
    (conf / "10-localmesh.conflist").write_text(json.dumps(local.topology.conflist(node.node)))
    return conf


def enrolled_ip(local: LocalMesh, node: str, name: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = http_get(
            local.nodes[node].node.netns, "127.0.0.1", 15000, "/config_dump?section=pods"
        )
        if status == 200:
            for pod in json.loads(body)["pods"]:
                if pod["name"] == name:
                    return str(pod["ips"][0]).split("/")[0]
        time.sleep(0.2)
    raise AssertionError(f"{name} was never enrolled on {node}")


def test_containers_reach_each_other_through_the_mesh(mesh, runtime):
    ctr, bin_dir = runtime
    node1, node2 = mesh.nodes["node-1"], mesh.nodes["node-2"]
    server = subprocess.Popen(
        ctr.argv(
            node2.node,
            "server",
            "busybox nc -ll -p 8080 -e /bin/cat",
            conf_dir=conf_dir_for(mesh, node2),
            bin_dir=bin_dir,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        server_ip = enrolled_ip(mesh, "node-2", "server")
        client = ctr.run(
            node1.node,
            "client",
            f"(echo hello-through-the-mesh; sleep 2) | busybox nc -w 5 {server_ip} 8080",
            conf_dir=conf_dir_for(mesh, node1),
            bin_dir=bin_dir,
        )
        assert "hello-through-the-mesh" in client.stdout, client.stdout + client.stderr
    finally:
        ctr.ctr("task", "kill", "-s", "KILL", "server")
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    assert node1.proxy is not None and node2.proxy is not None
    entries = wait_for_access_log(
        node2.proxy,
        lambda e: (
            e["reporter"] == "destination"
            and e["src"].get("identity") == "spiffe://cluster.local/ns/default/sa/client"
        ),
        timeout_s=10,
    )
    assert entries, (
        "node-2's proxy never saw the client's identity; it logged "
        + "\n".join(json.dumps(e) for e in access_log(node2.proxy))
        + "\nnode-1's proxy logged "
        + "\n".join(json.dumps(e) for e in access_log(node1.proxy))
    )
    assert {e["security_policy"] for e in entries} == {"mutual_tls"}
    assert entries[0]["dst"]["identity"] == "spiffe://cluster.local/ns/default/sa/server"
    # The containers' DEL unenrolled them on both nodes.
    for node in ("node-1", "node-2"):
        status, body = http_get(
            mesh.nodes[node].node.netns, "127.0.0.1", 15000, "/config_dump?section=pods"
        )
        assert (status, json.loads(body)["pods"]) == (200, [])
