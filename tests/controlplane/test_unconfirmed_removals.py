"""A removal the control plane did not confirm is sent again, before the next registration.

Otherwise the departed pod's IP stays taken there and the pod that gets the IP
next is refused with ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cp_testing import MESH_YAML, node_client, running_plane

from node_agent import controlplane_client

YAML = MESH_YAML.replace(
    "workloads:\n",
    "workloads:\n"
    "  - {name: client-2, namespace: default, serviceAccount: client, node: node-1}\n",
)


def test_an_unconfirmed_removal_is_resent_before_the_ip_is_reused(tmp_path, monkeypatch):
    async def scenario() -> None:
        async with (
            running_plane(tmp_path, YAML) as plane,
            node_client(plane, tmp_path, "node-1") as client,
        ):
            await client.register_workload(
                namespace="default", name="client", uid="uid-1", ips=["10.1.0.5"]
            )
            # A deadline too short to reach the control plane: a transient failure.
            with monkeypatch.context() as patch:
                patch.setattr(controlplane_client, "RPC_TIMEOUT_SECONDS", 1e-6)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await client.deregister_workload(
                        namespace="default", name="client", uid="uid-1"
                    )
            assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert set(client.unconfirmed_removals) == {"uid-1"}
            assert "default/client" in plane.state.dump()["registrations"]

            await client.register_workload(
                namespace="default", name="client-2", uid="uid-2", ips=["10.1.0.5"]
            )
            registrations = plane.state.dump()["registrations"]
            assert "default/client" not in registrations
            assert registrations["default/client-2"]["ips"] == ["10.1.0.5"]
            assert client.unconfirmed_removals == {}

    asyncio.run(scenario())
