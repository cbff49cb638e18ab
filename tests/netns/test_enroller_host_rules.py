"""The node's kubelet-probe rules follow enrollment: ADD, rollback, DEL, a new agent's converge.

Real HostProbes writing into a netns standing for the node, real pod sandbox
netns; capture, proxy and registration are fakes that record what they did.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin.protocol import PodInfo
from node_agent.enrollment.enroller import Enroller, EnrollmentError, MeshIntent
from node_agent.enrollment.registry import PodRecord, PodRegistry
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.host_probes import HOST_PROBES_CHAIN, HostProbes, ours
from node_agent.redirect.iptables import read_owned
from testbed.enrollment_fakes import AcceptingProxy
from weir_common.errors import TransientError

pytestmark = pytest.mark.netns


class Parts:
    """Capture, proxy and registrar fakes; `failing_register` makes registration fail."""

    def __init__(self) -> None:
        self.failing_register = False

    def apply(self, ns: Netns, config: CaptureConfig) -> None:
        return None

    def check(self, ns: Netns, config: CaptureConfig) -> list[str]:
        return []

    def remove(self, ns: object) -> None:
        return None

    def forget(self, netns_cookie: int) -> None:
        return None

    def prune(self) -> list[str]:
        return []

    async def register(self, record: PodRecord) -> None:
        if self.failing_register:
            raise TransientError("control plane unreachable")

    async def deregister(self, record: PodRecord) -> None:
        return None


class Directory:
    def lookup(self, namespace: str, name: str) -> MeshIntent | str:
        return MeshIntent(service_account="default")


def _netns() -> Iterator[str]:
    name = f"weirt-h{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def node() -> Iterator[Netns]:
    for path in _netns():
        yield Netns.validate(path)


@pytest.fixture
def sandbox() -> Iterator[str]:
    yield from _netns()


def agent(tmp_path: Path, node: Netns, parts: Parts) -> tuple[Enroller, HostProbes]:
    """A fresh agent process: empty memory, the registry file as it is."""
    registry = PodRegistry(tmp_path / "pods.json")
    registry.load()
    host = HostProbes(Backend.NFT, node)
    enroller = Enroller(
        capture=parts,
        mode="fake",
        proxy=AcceptingProxy(),
        registrar=parts,
        directory=Directory(),
        registry=registry,
        host_rules=host,
    )
    return enroller, host


def snat_targets(node: Netns) -> list[str]:
    """Pod IPs the node's WEIR-HOST-PROBES SNATs to (IPv4), or ["no chain"]."""
    nat = ours(read_owned(node, 4, Backend.NFT)).get("nat")
    if nat is None or HOST_PROBES_CHAIN not in nat.chains:
        return ["no chain"]
    return [rule.split()[1] for rule in nat.chains[HOST_PROBES_CHAIN]]


def pod(netns: str, uid: str = "uid-1", ip: str = "10.244.1.5/24") -> PodInfo:
    return PodInfo(f"cid-{uid}", netns, "eth0", (ip,), "default", f"app-{uid}", uid)


def test_add_snats_the_node_to_the_pod_and_delete_undoes_it(tmp_path, node, sandbox):
    enroller, _ = agent(tmp_path, node, Parts())
    asyncio.run(enroller.add(pod(sandbox)))
    assert snat_targets(node) == ["10.244.1.5/32"]
    asyncio.run(enroller.delete("cid-uid-1"))
    assert snat_targets(node) == []


def test_a_failed_enrollment_takes_its_rule_back(tmp_path, node, sandbox):
    parts = Parts()
    parts.failing_register = True
    enroller, _ = agent(tmp_path, node, parts)
    with pytest.raises(EnrollmentError, match="failed at registration"):
        asyncio.run(enroller.add(pod(sandbox)))
    assert snat_targets(node) == []


def test_a_new_agent_keeps_enrolled_pods_and_drops_departed_ones(tmp_path, node, sandbox):
    enroller, _ = agent(tmp_path, node, Parts())
    asyncio.run(enroller.add(pod(sandbox)))
    # An earlier agent's rule for a pod that left while no agent ran.
    HostProbes(Backend.NFT, node).add("uid-gone", ["10.244.1.9/24", "10.244.1.5/24"])
    assert snat_targets(node) == ["10.244.1.5/32", "10.244.1.9/32"]

    restarted, host = agent(tmp_path, node, Parts())
    asyncio.run(restarted.converge())
    assert snat_targets(node) == ["10.244.1.5/32"]
    assert host.check() == []


def test_converge_repairs_a_flushed_chain(tmp_path, node, sandbox):
    enroller, host = agent(tmp_path, node, Parts())
    asyncio.run(enroller.add(pod(sandbox)))
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            node.path.name,
            "iptables-nft",
            "-t",
            "nat",
            "-F",
            HOST_PROBES_CHAIN,
        ],
        check=True,
    )
    assert host.check() != []
    asyncio.run(enroller.converge())
    assert snat_targets(node) == ["10.244.1.5/32"]


def test_a_pod_gone_without_del_loses_its_rule_at_the_sweep(tmp_path, node):
    enroller, _ = agent(tmp_path, node, Parts())
    paths = _netns()
    sandbox = next(paths)
    asyncio.run(enroller.add(pod(sandbox)))
    next(paths, None)  # the sandbox's netns is deleted, no DEL comes
    asyncio.run(enroller.prune())
    assert snat_targets(node) == []


WEIR = "import sys; from weir_cli import main; sys.exit(main(sys.argv[1:]))"


def test_uninstall_removes_the_rules_from_both_backends_and_nothing_else(node):
    HostProbes(Backend.NFT, node).add("uid-1", ["10.244.1.5"])
    HostProbes(Backend.LEGACY, node).add("uid-1", ["10.244.1.5"])
    # Another Weir chain in the same netns is not the host probes' to remove.
    other = "*nat\n:WEIR-OTHER - [0:0]\n-A WEIR-OTHER -j RETURN\nCOMMIT\n"
    netns_run = ["ip", "netns", "exec", node.path.name]
    subprocess.run(
        [*netns_run, "iptables-nft-restore", "--noflush"], input=other, text=True, check=True
    )
    argv = [*netns_run, sys.executable, "-c", WEIR, "redirect", "uninstall-host-probes"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert (first.returncode, first.stdout.strip()) == (0, f"removed {HOST_PROBES_CHAIN}"), (
        first.stderr
    )
    assert snat_targets(node) == ["no chain"]
    assert ours(read_owned(node, 4, Backend.LEGACY)) == {}
    assert "WEIR-OTHER" in read_owned(node, 4, Backend.NFT)["nat"].chains
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert (again.returncode, again.stdout.strip()) == (0, "nothing installed"), again.stderr
