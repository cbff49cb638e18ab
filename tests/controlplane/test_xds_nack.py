"""Real control plane and XdsClient: a NACKed push leaves the previous snapshot in force."""

import asyncio

import pytest
from cp_testing import MESH_YAML, node_client, running, running_plane

from controlplane import metrics as m
from node_agent.proxy.xds_source import SnapshotHandler
from testbed.proxy_fakes import SnapshotConsumer
from weir_common.mesh import WORKLOAD_TYPE

pytestmark = pytest.mark.timeout(60)

EXTRA = (
    "  - {name: extra, namespace: default, serviceAccount: extra, node: node-2, "
    "labels: {app: server}}\n"
)


async def until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def test_a_push_the_proxy_fails_on_is_nacked_and_the_previous_snapshot_stays(tmp_path):
    consumer = SnapshotConsumer()

    def endpoints() -> int:
        snapshot = consumer.in_force
        service = None if snapshot is None else snapshot.services.get("default/server")
        return 0 if service is None else len(service.endpoints)

    async def scenario() -> None:
        async with (
            running_plane(tmp_path) as plane,
            node_client(plane, tmp_path, "node-1") as client,
            running(client.subscribe(SnapshotHandler(consumer))) as xds,
        ):
            await until(lambda: endpoints() == 1)
            held = xds.versions(WORKLOAD_TYPE)
            consumer.refuse = "default/extra"
            (tmp_path / "mesh.yaml").write_text(
                MESH_YAML.replace("services:\n", EXTRA + "services:\n")
            )
            await until(lambda: plane.metrics.value(m.NACKS, type_url=WORKLOAD_TYPE) >= 1)
            assert consumer.in_force is not None
            assert set(consumer.in_force.workloads) == {"default/client", "default/server"}
            assert xds.versions(WORKLOAD_TYPE) == held
            # The service push that follows is accepted, on top of the old workloads.
            await until(lambda: endpoints() == 2)
            assert "default/extra" not in consumer.in_force.workloads
            assert xds.versions(WORKLOAD_TYPE) == held

    asyncio.run(scenario())
