"""The follower with a real Enroller and registry, fake capture/proxy/registrar and a fake /proc.

What the reconcile loop does when the cache changes, and how the CNI ADD gate
answers while the watch or the control plane lags.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.protocol import PodInfo
from node_agent.enrollment.enroller import Enroller, MeshIntent
from node_agent.enrollment.registry import PodRegistry
from node_agent.kubernetes.discovery import ProcessInfo
from node_agent.kubernetes.follower import NAMESPACES, PODS, PodFollower
from node_agent.mesh_view import MeshView
from node_agent.netns import Netns
from node_agent.redirect.config import CaptureConfig
from testbed.enrollment_fakes import AcceptingProxy, AcceptingRegistrar, FakeCapture
from testbed.proxy_fakes import self_signed_root_pem
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.errors import InvalidInputError, TransientError
from weir_common.mesh import POLICY_TYPE, SERVICE_TYPE, TRUST_BUNDLE_TYPE, WORKLOAD_TYPE

UID = "5f3c2a1e-8b7d-4c6e-9f01-23456789abcd"
PAUSE = "a" * 64
APP = "b" * 64
POD_NETNS = "/var/run/netns/cni-0b6c"
NETNS_INODE = 4026532777
MESHED_NS = {"metadata": {"name": "shop", "labels": {"weir.dev/mesh": "enabled"}}}


@pytest.fixture(autouse=True)
def pod_netns_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's netns, as Netns.validate would find it (no namespaces in unit tests)."""

    def validate(cls: type[Netns], path: str | Path) -> Netns:
        if str(path) != POD_NETNS:
            raise InvalidInputError(f"network namespace {path} does not exist")
        return cls(Path(path), NETNS_INODE)

    monkeypatch.setattr(Netns, "validate", classmethod(validate))


def pod_object(**labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "shop",
            "name": "web",
            "uid": UID,
            "labels": dict(labels),
            "annotations": {"weir.dev/exclude-outbound-ports": "22"},
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Running",
            "podIPs": [{"ip": "10.244.1.5"}],
            "containerStatuses": [{"containerID": f"containerd://{APP}"}],
        },
    }


class FakeProc:
    def __init__(self) -> None:
        self.pause_running = True

    def processes(self) -> Iterator[ProcessInfo]:
        path = f"/n1/kubepods/besteffort/pod{UID}"
        if self.pause_running:
            yield ProcessInfo(100, f"0::{path}/{PAUSE}\n", NETNS_INODE)
        yield ProcessInfo(120, f"0::{path}/{APP}\n", NETNS_INODE)

    def named_netns(self) -> Mapping[int, str]:
        return {NETNS_INODE: POD_NETNS}


def mesh_view(*workloads: str) -> MeshView:
    view = MeshView("n1")
    bundle = mesh_pb2.TrustBundle(
        trust_domain="cluster.local", root_certificates_pem=[self_signed_root_pem()]
    )
    view.apply(TRUST_BUNDLE_TYPE, {"trust-bundle": bundle}, ["trust-bundle"], [])
    push_workloads(view, *workloads)
    view.apply(SERVICE_TYPE, {}, [], [])
    view.apply(POLICY_TYPE, {}, [], [])
    return view


def push_workloads(view: MeshView, *names: str) -> None:
    found = {
        f"shop/{n}": mesh_pb2.Workload(
            name=n, namespace="shop", service_account=n, node="n1", captured=True
        )
        for n in names
    }
    view.apply(WORKLOAD_TYPE, found, list(found), [])


class Node:
    def __init__(self, tmp_path: Path, mesh: MeshView) -> None:
        self.mesh = mesh
        self.proc = FakeProc()
        self.capture = FakeCapture()
        self.registry = PodRegistry(tmp_path / "pods.json")
        self.follower = PodFollower(
            "n1", mesh, self.registry, self.proc, resync_s=60.0, admission_wait_s=0.3
        )
        self.follower.enroller = Enroller(
            capture=self.capture,
            mode="fake",
            proxy=AcceptingProxy(),
            registrar=AcceptingRegistrar(),
            directory=self.follower,
            registry=self.registry,
        )

    def list(self, pods: list[dict[str, Any]], namespaces: list[dict[str, Any]]) -> None:
        """What the watches' first lists deliver (from their threads)."""
        self.follower.replace(PODS, pods)
        self.follower.replace(NAMESPACES, namespaces)


async def settled() -> None:
    # Cache updates are posted to the loop with call_soon_threadsafe.
    for _ in range(3):
        await asyncio.sleep(0)


def test_running_pod_is_enrolled_as_its_add_would_have_and_unenrolled_when_it_opts_out(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        node = Node(tmp_path, mesh_view("web"))
        node.follower.attach(asyncio.get_running_loop())
        assert (
            node.follower.not_synced() == "pods and namespaces not listed from the API server yet"
        )
        node.list([pod_object()], [MESHED_NS])
        await settled()
        assert node.follower.not_synced() is None

        await node.follower.reconcile()
        record = node.registry.get(UID)
        assert record is not None and record.enrolled
        assert (record.container_id, record.netns, record.ips) == (
            PAUSE,
            POD_NETNS,
            ("10.244.1.5/32",),
        )
        assert node.capture.applied == {POD_NETNS: CaptureConfig(exclude_outbound_ports=(22,))}
        assert node.follower.dump()["pods"] == {"shop/web": "captured"}

        node.follower.event(PODS, "MODIFIED", pod_object(**{"weir.dev/mesh": "disabled"}))
        await settled()
        await node.follower.reconcile()
        assert node.registry.get(UID) is None
        assert node.capture.applied == {}
        assert node.follower.status == {
            "shop/web": "left the mesh: pod is labeled weir.dev/mesh=disabled"
        }

    asyncio.run(scenario())


def test_a_pod_whose_sandbox_cannot_be_found_is_not_touched_and_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        node = Node(tmp_path, mesh_view("web"))
        node.follower.attach(asyncio.get_running_loop())
        node.proc.pause_running = False
        node.list([pod_object()], [MESHED_NS])
        await settled()
        await node.follower.reconcile()
        assert node.registry.get(UID) is None
        assert node.capture.applied == {}
        assert node.follower.status["shop/web"].startswith(
            "not enrolled: sandbox not found: no sandbox process found"
        )

    asyncio.run(scenario())


def test_the_loop_reconciles_within_a_second_of_a_watch_event(tmp_path: Path) -> None:
    async def scenario() -> None:
        node = Node(tmp_path, mesh_view("web"))
        loop = asyncio.get_running_loop()
        node.follower.attach(loop)
        task = loop.create_task(node.follower.run())
        try:
            # From another thread, as the watch threads deliver.
            lister = threading.Thread(target=node.list, args=([pod_object()], [MESHED_NS]))
            lister.start()
            lister.join()
            for _ in range(50):
                if node.registry.get(UID) is not None:
                    break
                await asyncio.sleep(0.02)
            assert node.registry.get(UID) is not None
            # The namespace loses its label: unenrolled by the next pass.
            node.follower.event(NAMESPACES, "MODIFIED", {"metadata": {"name": "shop"}})
            for _ in range(50):
                if node.registry.get(UID) is None:
                    break
                await asyncio.sleep(0.02)
            assert node.registry.get(UID) is None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_the_add_gate_waits_for_the_watch_and_the_control_plane(tmp_path: Path) -> None:
    add = PodInfo(PAUSE, POD_NETNS, "eth0", ("10.244.1.5/24",), "shop", "web", UID)

    async def scenario() -> None:
        view = mesh_view()  # the control plane has not pushed shop/web yet
        node = Node(tmp_path, view)
        node.follower.attach(asyncio.get_running_loop())
        # The watch has not shown the pod: fail closed, retryably.
        with pytest.raises(TransientError, match="not known to the agent's watch"):
            await node.follower.admit(add)
        with pytest.raises(TransientError, match="not known to the agent's watch"):
            node.follower.lookup("shop", "web")

        node.list([pod_object()], [MESHED_NS])
        await settled()
        with pytest.raises(TransientError, match="has not pushed its workload yet"):
            await node.follower.admit(add)

        # The push arrives while the ADD waits: the ADD goes on.
        waiting = asyncio.get_running_loop().create_task(node.follower.admit(add))
        await asyncio.sleep(0.05)
        push_workloads(view, "web")
        assert await waiting is None
        assert node.follower.lookup("shop", "web") == MeshIntent(
            "web", CaptureConfig(exclude_outbound_ports=(22,))
        )

        # A pod outside the mesh starts uncaptured at once.
        plain = [{"metadata": {"name": "shop"}}]
        node.list([pod_object()], plain)
        await settled()
        assert await node.follower.admit(add) == ("namespace is not labeled weir.dev/mesh=enabled")

        # A bad annotation refuses the ADD (not retryable), naming it.
        bad = copy.deepcopy(pod_object())
        bad["metadata"]["annotations"] = {"weir.dev/include-inbound-ports": "http"}
        node.list([bad], [MESHED_NS])
        await settled()
        with pytest.raises(InvalidInputError, match=r"weir\.dev/include-inbound-ports") as raised:
            await node.follower.admit(add)
        assert not raised.value.retryable

        # A runtime without Kubernetes names no pod: the mesh view alone decides.
        assert await node.follower.admit(add._replace(namespace="", name="")) is None

    asyncio.run(scenario())
