"""The node agent end to end: CNI chain -> weir-cni -> agent -> capture + handoff + registration.

A real control plane (TLS, in the underlay), a real agent process in the node
netns, pods created by running the node's CNI chain with the frozen weir-cni.
The proxy is a stand-in that follows the agent's handoff and listens on the
capture ports inside each pod it is given, so this test is about enrollment,
not about the proxy.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from node_agent.localmesh.cni_runtime import CniPluginError
from node_agent.localmesh.mesh import REPO, LocalMesh, MeshNode, http_get
from node_agent.localmesh.traffic import TrafficObserver, connect
from node_agent.netns import Netns
from node_agent.proxy_handoff.protocol import EnrolledPod
from node_agent.proxy_handoff.proxy_side import ProxyHandoffClient
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.iptables import IptablesCapture

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

CONFIG = REPO / "examples" / "mesh.yaml"
SERVICE_VIP = "10.96.0.10"


class StandInProxy:
    """Listens on 15001/15006 in every pod the agent hands over, records what lands."""

    def __init__(self, node: MeshNode) -> None:
        self.seen = TrafficObserver()
        self.pods: dict[str, EnrolledPod] = {}
        self._loop = asyncio.new_event_loop()
        self._client = ProxyHandoffClient(node.handoff_socket, self)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._client.run())
        self._loop.run_forever()

    async def add_pod(self, pod: EnrolledPod, netns: Netns) -> None:
        if pod.uid not in self.pods:
            self.seen.listen(netns, f"{pod.name}:15001", 15001, ipv6=False)
            self.seen.listen(netns, f"{pod.name}:15006", 15006, ipv6=False)
        self.pods[pod.uid] = pod

    async def remove_pod(self, uid: str) -> None:
        self.pods.pop(uid, None)

    async def _shutdown(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self.seen.close()


@pytest.fixture(scope="module")
def plugin_bundle() -> None:
    subprocess.run(["scripts/build-cni-plugin.sh"], cwd=REPO, check=True, timeout=300)


@pytest.fixture
def mesh(plugin_bundle) -> Iterator[tuple[LocalMesh, dict[str, StandInProxy]]]:
    proxies: dict[str, StandInProxy] = {}

    def start(_mesh: LocalMesh, node: MeshNode) -> Callable[[], None]:
        proxies[node.node.name] = StandInProxy(node)
        return proxies[node.node.name].stop

    with LocalMesh(CONFIG, start) as local:
        yield local, proxies


def agent_dump(local: LocalMesh, node: str) -> dict:
    status, body = http_get(local.nodes[node].node.netns, "127.0.0.1", 15000, "/config_dump")
    assert status == 200
    return json.loads(body)


def landed(proxy: StandInProxy, pod, dst: str, port: int) -> str | None:
    attempt = connect(pod.netns, dst, port, timeout=2)
    arrival = proxy.seen.wait_for(attempt.token, timeout=2)
    return arrival.listener if arrival else None


def test_pod_is_captured_by_the_time_add_returns(mesh):
    local, proxies = mesh
    local.add_node("node-1", "10.244.1.0/24")
    client = local.add_pod("node-1", "client")

    # The very first connection of the pod goes to the proxy.
    assert landed(proxies["node-1"], client, SERVICE_VIP, 80) == "client:15001"
    assert IptablesCapture(Backend.NFT).check(client.netns, CaptureConfig()) == []

    pods = agent_dump(local, "node-1")["pods"]
    assert [(p["name"], p["status"], p["mode"]) for p in pods] == [
        ("client", "captured", "iptables-nft")
    ]
    assert [p.name for p in proxies["node-1"].pods.values()] == ["client"]

    # The control plane learned the pod's uid and IP from the agent.
    status, body = http_get(
        local.topology.underlay, str(local.topology.router_v4), 15014, "/debug/config_dump"
    )
    assert status == 200
    assert str(client.ipv4) in body.decode()


def test_pods_outside_the_mesh_config_are_left_alone(mesh):
    local, proxies = mesh
    local.add_node("node-1", "10.244.1.0/24")
    stranger = local.add_pod("node-1", "stranger")
    assert landed(proxies["node-1"], stranger, SERVICE_VIP, 80) is None
    assert agent_dump(local, "node-1")["pods"] == []


def test_deleting_a_pod_removes_everything(mesh):
    local, proxies = mesh
    local.add_node("node-1", "10.244.1.0/24")
    client = local.add_pod("node-1", "client")
    local.topology.remove_pod(client)
    assert agent_dump(local, "node-1")["pods"] == []
    assert proxies["node-1"].pods == {}


def test_agent_restart_keeps_pods_captured_and_new_pods_fail_closed_meanwhile(mesh):
    local, proxies = mesh
    local.add_node("node-1", "10.244.1.0/24")
    client = local.add_pod("node-1", "client")

    local.nodes["node-1"].agent.kill()
    # Capture lives in the pod netns, not in the agent: still in force.
    assert landed(proxies["node-1"], client, SERVICE_VIP, 80) == "client:15001"
    # A pod created while the agent is down does not start uncaptured.
    with pytest.raises(CniPluginError) as failed:
        local.add_pod("node-1", "intruder", namespace="legacy")
    assert failed.value.code == 11, failed.value.msg

    local.restart_agent("node-1")
    local.wait_agent_ready("node-1")
    intruder = local.add_pod("node-1", "intruder", namespace="legacy")
    assert landed(proxies["node-1"], intruder, SERVICE_VIP, 80) == "intruder:15001"
    names = sorted(p["name"] for p in agent_dump(local, "node-1")["pods"])
    assert names == ["client", "intruder"]
