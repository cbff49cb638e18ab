"""The agent's exit on Kubernetes in a real kernel: an uninstall leaves the node clean, an upgrade
leaves it as it was.

A node netns with a pod sandbox made by the topology's own CNI chain, captured
by the real Enroller (iptables nft, or eBPF under a private pin root) with the
node's real WEIR-HOST-PROBES; a node CNI config dir with weir-cni put in by
the real CniSetup; then `shutdown` as the agent runs it, with an API server
stand-in that says the agent's DaemonSet is gone (uninstall) or in place
(a rolling update).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from cni_plugin.protocol import PodInfo
from node_agent.agent.cni_setup import CniSetup, CniSetupSettings
from node_agent.cni_install.conflist import PluginSettings
from node_agent.enrollment.enroller import CaptureEngine, Enroller, MeshIntent
from node_agent.enrollment.registry import PodRecord, PodRegistry
from node_agent.kubernetes.uninstall import NodeCleanup, UninstallCheck, shutdown
from node_agent.localmesh.topology import LocalTopology, Node, Pod
from node_agent.netns import Netns
from node_agent.proxy_handoff.protocol import EnrolledPod
from node_agent.redirect.backend import Backend
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import PinLayout
from node_agent.redirect.host_probes import HOST_PROBES_CHAIN, HostProbes
from node_agent.redirect.iptables import IptablesCapture

pytestmark = pytest.mark.netns

NS, POD = "weir-system", "weir-agent-x7k2p"
PRIMARY = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


class Response:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.data = json.dumps(obj).encode()

    def release_conn(self) -> None:
        return None


class ApiServer:
    """The agent's namespace and pod as they are; its DaemonSet there or gone."""

    def __init__(self, *, daemonset_there: bool) -> None:
        self.daemonset_there = daemonset_there
        self.api_client = None

    def read_namespace(self, name: str, **_: Any) -> Response:
        return Response({"metadata": {"name": name}})

    def read_namespaced_pod(self, name: str, namespace: str, **_: Any) -> Response:
        owner = {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "name": "weir-agent",
            "uid": "ds-1",
            "controller": True,
        }
        return Response({"metadata": {"name": name, "ownerReferences": [owner]}})

    def read_namespaced_daemon_set(self, name: str, namespace: str, **_: Any) -> Response:
        if not self.daemonset_there:
            raise ApiException(status=404, reason="Not Found")
        return Response({"metadata": {"name": name, "uid": "ds-1"}})

    def list_namespace(self, **_: Any) -> None:
        raise AssertionError("the namespace watch is not run here")


class Parts:
    """The proxy and the control plane registrar: the kernel is what is under test."""

    def __init__(self) -> None:
        self.handed_back: list[str] = []

    async def add(self, pod: EnrolledPod, netns: Netns) -> None:
        return None

    async def remove(self, uid: str) -> None:
        self.handed_back.append(uid)

    async def register(self, record: PodRecord) -> None:
        return None

    async def deregister(self, record: PodRecord) -> None:
        return None


class Directory:
    def lookup(self, namespace: str, name: str) -> MeshIntent | str:
        return MeshIntent(service_account="default")


@dataclass
class NodeUnderTest:
    node: Node
    pod: Pod
    conf_dir: Path
    bin_dir: Path
    cni: CniSetup
    registry: PodRegistry
    capture: CaptureEngine
    parts: Parts

    def conflist(self) -> dict[str, Any]:
        return dict(json.loads((self.conf_dir / "10-bridge.conflist").read_text()))

    def shutdown(self, api: ApiServer, pins: PinLayout | None = None) -> bool:
        check = UninstallCheck(api, POD, NS, apps=api)  # type: ignore[arg-type]

        async def quiesce() -> None:
            await asyncio.to_thread(self.cni.stop)

        def cleanup() -> NodeCleanup:
            return NodeCleanup(
                registry=self.registry,
                capture=self.capture,
                proxy=self.parts,
                cni=self.cni,
                pins=pins,
                host_netns=self.node.netns,
            )

        return asyncio.run(shutdown(check, quiesce, cleanup))


def iptables_save(ns: Netns, backend: str, family: int) -> str:
    tool = f"ip{'6' if family == 6 else ''}tables-{backend}-save"
    out = subprocess.run(
        ["nsenter", f"--net={ns.path}", tool],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def weir_lines(ns: Netns) -> list[str]:
    """Every line of either backend's ruleset in `ns` that names a WEIR chain."""
    return [
        f"{backend} IPv{family}: {line}"
        for backend in ("nft", "legacy")
        for family in (4, 6)
        for line in iptables_save(ns, backend, family).splitlines()
        if "WEIR" in line
    ]


def wait_until_installed(cni: CniSetup) -> None:
    deadline = time.monotonic() + 10
    while cni.not_ready() is not None:
        assert time.monotonic() < deadline, cni.not_ready()
        time.sleep(0.05)


@pytest.fixture
def topology() -> Iterator[tuple[Node, Pod]]:
    with LocalTopology() as topo:
        node = topo.add_node("node-1", "10.244.1.0/24")
        yield node, topo.add_pod(node, "app")


@pytest.fixture
def cni_setups() -> Iterator[list[CniSetup]]:
    """Every CniSetup a test starts, stopped after it whatever happened."""
    started: list[CniSetup] = []
    try:
        yield started
    finally:
        for cni in started:
            cni.stop()


def build(
    tmp_path: Path,
    node: Node,
    pod: Pod,
    capture: CaptureEngine,
    mode: str,
    started: list[CniSetup],
) -> NodeUnderTest:
    bundle, conf_dir, bin_dir = tmp_path / "bundle", tmp_path / "net.d", tmp_path / "bin"
    for d in (bundle, conf_dir, bin_dir):
        d.mkdir()
    (bundle / "weir-cni").write_text("#!/bin/sh\n")
    (bundle / "weir-cni").chmod(0o755)
    (bin_dir / "bridge").write_text("#!/bin/sh\n")
    (conf_dir / "10-bridge.conflist").write_text(json.dumps(PRIMARY))
    cni = CniSetup(
        CniSetupSettings(
            conf_dir=conf_dir,
            bin_dir=bin_dir,
            bundle=bundle,
            plugin=PluginSettings(agent_socket="/run/weir/cni.sock"),
            wait_s=5.0,
        )
    )
    started.append(cni)
    cni.start()
    parts = Parts()
    registry = PodRegistry(tmp_path / "state" / "pods.json")
    enroller = Enroller(
        capture=capture,
        mode=mode,
        proxy=parts,
        registrar=parts,
        directory=Directory(),
        registry=registry,
        host_rules=HostProbes(Backend.NFT, node.netns),
    )
    info = PodInfo(
        pod.container_id,
        str(pod.netns.path),
        "eth0",
        (f"{pod.ipv4}/24",),
        pod.namespace,
        pod.name,
        pod.uid,
    )
    wait_until_installed(cni)
    asyncio.run(enroller.add(info))
    return NodeUnderTest(node, pod, conf_dir, bin_dir, cni, registry, capture, parts)


def test_uninstall_leaves_the_node_clean_iptables(
    tmp_path: Path, topology: tuple[Node, Pod], cni_setups: list[CniSetup]
) -> None:
    node, pod = topology
    under = build(tmp_path, node, pod, IptablesCapture(Backend.NFT), "iptables-nft", cni_setups)
    assert [p["type"] for p in under.conflist()["plugins"]] == ["bridge", "portmap", "weir-cni"]
    assert weir_lines(pod.netns) != []
    assert any(HOST_PROBES_CHAIN in line for line in weir_lines(node.netns))

    assert under.shutdown(ApiServer(daemonset_there=False)) is True

    assert under.conflist() == PRIMARY  # the rest of the chain as the primary CNI wrote it
    assert sorted(p.name for p in under.bin_dir.iterdir()) == ["bridge"]
    assert weir_lines(pod.netns) == []
    assert weir_lines(node.netns) == []
    assert not under.registry.path.exists()
    assert under.parts.handed_back == [pod.uid]


def test_upgrade_leaves_everything_in_place(
    tmp_path: Path, topology: tuple[Node, Pod], cni_setups: list[CniSetup]
) -> None:
    node, pod = topology
    under = build(tmp_path, node, pod, IptablesCapture(Backend.NFT), "iptables-nft", cni_setups)
    conflist = under.conflist()
    pod_rules, node_rules = weir_lines(pod.netns), weir_lines(node.netns)
    registry = under.registry.path.read_text()

    assert under.shutdown(ApiServer(daemonset_there=True)) is False

    assert under.conflist() == conflist
    assert (under.bin_dir / "weir-cni").is_symlink()
    assert weir_lines(pod.netns) == pod_rules
    assert weir_lines(node.netns) == node_rules
    assert under.registry.path.read_text() == registry
    assert under.parts.handed_back == []


def test_uninstall_removes_ebpf_capture_and_pins(
    tmp_path: Path, topology: tuple[Node, Pod], pins: PinLayout, cni_setups: list[CniSetup]
) -> None:
    node, pod = topology
    with EbpfCapture(pins) as capture:
        under = build(tmp_path, node, pod, capture, "ebpf", cni_setups)
        assert pins.pod_links() != {}
        assert under.shutdown(ApiServer(daemonset_there=False), pins) is True
    assert not pins.root.exists()
    assert under.conflist() == PRIMARY
    assert weir_lines(node.netns) == []
    assert not under.registry.path.exists()
