"""The agent starts on a node that rebooted, or looks as if it had, and reconciles from scratch.

One node of the real local mesh. Pods alpha, bravo, charlie, delta and echo
are enrolled; then the node "powers off" (agent killed -9, proxy stopped) and,
while nothing of Weir runs, the node changes under the agent's registry:

- alpha's netns is gone (its DEL never reached an agent);
- bravo's netns path holds a new netns (another inode), not enrolled by anyone;
- charlie's capture is half there (iptables: a chain flushed; eBPF: its
  sk_lookup link unpinned);
- delta and echo are as they were;
- eBPF: the pins of a pod no registry knows (zulu, its netns gone) are left
  behind; in a second power cycle the pins are all gone while the registry
  still says eBPF; in a third, only the maps are pinned (an install killed
  half-way).

After "power on" (agent, then a new proxy), once the agent is ready: alpha
and bravo are forgotten by the agent, the proxy and the control plane, and
bravo's new netns is left alone; charlie's capture is whole again; no capture
state is left for a netns that is gone; every remaining pod is captured with
the proxy's listeners and reaches echo with mutual_tls. Pods the runtime
makes again are enrolled by the normal ADD.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.constants import ADMIN_PORT, PROXY_ADMIN_PORT
from node_agent.localmesh import wiring
from node_agent.localmesh.mesh import (
    CONTROLPLANE_HTTP_PORT,
    LocalMesh,
    MeshNode,
    http_get,
    real_proxy,
)
from node_agent.localmesh.topology import Pod
from node_agent.localmesh.traffic import TrafficObserver
from node_agent.netns import Netns
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.podnet import netns_cookie
from tests.netns.agent_state import (
    LISTENER_PORTS,
    NODE,
    admin_json,
    agent_backend,
    assert_served,
    capture_problems,
    captured,
    ebpf_cookies,
    listening,
    one_node_mesh_config,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

ECHO_PORT = 8080
PODS = ("alpha", "bravo", "charlie", "delta")


@pytest.fixture
def reboot_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[LocalMesh, dict[str, Pod], TrafficObserver]]:
    monkeypatch.setenv("WEIR_REDIRECT_MODE", request.param)
    with (
        LocalMesh(
            one_node_mesh_config(tmp_path / "mesh.yaml", {n: n for n in (*PODS, "echo")}),
            real_proxy,
        ) as local,
        TrafficObserver() as apps,
    ):
        local.add_node(NODE, "10.244.1.0/24")
        pods = {name: local.add_pod(NODE, name) for name in (*PODS, "echo")}
        apps.listen(pods["echo"].netns, "echo", ECHO_PORT, ipv6=False)
        yield local, pods, apps


def agent_log(node: MeshNode) -> str:
    assert node.agent is not None
    return node.agent.tail(80)


def power_off(local: LocalMesh) -> None:
    node = local.nodes[NODE]
    assert node.agent is not None and node.stop_proxy is not None
    node.agent.kill()
    node.stop_proxy()
    node.stop_proxy = None


def power_on(local: LocalMesh) -> None:
    node = local.nodes[NODE]
    local.restart_agent(NODE, kill=True)
    node.stop_proxy = real_proxy(local, node)
    local.wait_agent_ready(NODE)


def vanish(local: LocalMesh, pod: Pod) -> None:
    """The sandbox goes while no agent runs: its DEL is not delivered (weir-cni says so)."""
    local.topology.remove_pod(pod)


def recreate_at_same_path(pod: Pod) -> Netns:
    """A new netns where the pod's was, as a runtime reusing the path would make it."""
    ns = wiring.create_netns(pod.netns_name)
    assert ns.inode != pod.netns.inode
    return ns


def registrations(local: LocalMesh) -> set[str]:
    status, body = http_get(
        local.topology.underlay,
        str(local.topology.router_v4),
        CONTROLPLANE_HTTP_PORT,
        "/debug/config_dump",
    )
    assert status == 200, body
    return set(json.loads(body)["registrations"])


def assert_reconciled(
    local: LocalMesh, mode: str, live: dict[str, Pod], gone: set[str], apps: TrafficObserver
) -> None:
    node = local.nodes[NODE]
    wanted = {pod.uid: name for name, pod in live.items()}
    records = admin_json(node, ADMIN_PORT, "pods")
    assert {r["uid"]: r["name"] for r in records} == wanted
    assert {r["status"] for r in records} == {"captured"}, records
    deadline = time.monotonic() + 20
    # Deregistrations are sent as the agent starts; the proxy drops pods at its snapshot's end.
    while registrations(local) & {f"default/{name}" for name in gone}:
        assert time.monotonic() < deadline, (registrations(local), agent_log(node))
        time.sleep(0.2)
    assert set(admin_json(node, PROXY_ADMIN_PORT, "pods")) == set(wanted)
    for name, pod in live.items():
        # Ready means capture steers to the new proxy already (eBPF: its listeners registered).
        assert capture_problems(mode, node, pod.netns) == [], name
        assert listening(pod.netns) == LISTENER_PORTS, name
    if mode == "ebpf":
        assert ebpf_cookies(node) == {netns_cookie(pod.netns) for pod in live.values()}
    echo = live["echo"]
    assert_served(node, {n: p for n, p in live.items() if n != "echo"}, echo, ECHO_PORT, apps)


def break_capture(mode: str, node: MeshNode, pod: Pod) -> None:
    """Leave the pod's capture half there."""
    if mode == "iptables":
        backend = agent_backend(pod.netns)
        flush = [f"iptables-{backend}", "-t", "nat", "-F", "WEIR-OUTBOUND"]
        assert pod.run(flush).returncode == 0, pod.run(flush).stderr
    else:
        node.pins.pod_link(netns_cookie(pod.netns)).unlink()
    assert capture_problems(mode, node, pod.netns)


def leave_stale_pins(local: LocalMesh, node: MeshNode) -> int:
    """eBPF capture of a netns no registry knows, whose netns then went: an earlier agent's."""
    name = f"{local.topology.prefix}-pod-default-zulu"
    ns = wiring.create_netns(name)
    with EbpfCapture(node.pins) as engine:
        engine.apply(ns, CaptureConfig())
    cookie = netns_cookie(ns)
    wiring.delete_netns(name)
    assert cookie in ebpf_cookies(node)
    return cookie


@pytest.mark.parametrize("reboot_mesh", ["iptables", "ebpf"], indirect=True)
def test_agent_reconciles_a_rebooted_node_from_scratch(reboot_mesh, request):
    local, pods, apps = reboot_mesh
    mode = request.node.callspec.params["reboot_mesh"]
    node = local.nodes[NODE]
    assert registrations(local) >= {f"default/{name}" for name in pods}

    power_off(local)
    vanish(local, pods["alpha"])
    vanish(local, pods["bravo"])
    stranger = recreate_at_same_path(pods["bravo"])
    break_capture(mode, node, pods["charlie"])
    stale = leave_stale_pins(local, node) if mode == "ebpf" else None
    power_on(local)

    live = {name: pods[name] for name in ("charlie", "delta", "echo")}
    assert_reconciled(local, mode, live, {"alpha", "bravo"}, apps)
    # The netns now at bravo's path is nobody's enrolled pod: left as it was.
    assert not captured(stranger, mode, node)
    if stale is not None:
        assert stale not in ebpf_cookies(node)

    if mode == "ebpf":
        # Again, and this time the node lost every pin (bpffs is memory: a real reboot).
        power_off(local)
        loader.uninstall(node.pins)
        power_on(local)
        assert_reconciled(local, mode, live, {"alpha", "bravo"}, apps)
        # And again, with what an agent killed in its first install after the reboot
        # leaves: the maps pinned, no program, no link.
        power_off(local)
        for pin in node.pins.all_pins():
            if pin.parent.name != "maps":
                pin.unlink()
        assert not loader.install_state(node.pins).installed
        power_on(local)
        assert_reconciled(local, mode, live, {"alpha", "bravo"}, apps)

    # The runtime makes the sandboxes again; the normal ADD enrolls them.
    wiring.delete_netns(pods["bravo"].netns_name)
    for name in ("alpha", "bravo"):
        live[name] = local.add_pod(NODE, name)
    assert_reconciled(local, mode, live, set(), apps)
    assert registrations(local) >= {f"default/{name}" for name in live}
