"""A removal the control plane did not confirm is sent again, before the next registration.

Otherwise the departed pod's IP stays taken there and the pod that gets the IP
next is refused with ALREADY_EXISTS. The node reaches the control plane
through a relay the test can cut, so the removal fails for a reason that
retrying fixes (the network), while the control plane itself stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from cp_testing import FAST_BACKOFF, MESH_YAML, TOKENS, root_file, running_plane

from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import ControlPlaneClient

YAML = MESH_YAML.replace(
    "workloads:\n",
    "workloads:\n  - {name: client-2, namespace: default, serviceAccount: client, node: node-1}\n",
)


class Relay:
    """TCP on loopback to the control plane; `cut` drops every connection and refuses new ones."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self.cut = False
        self._writers: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def cut_now(self) -> None:
        self.cut = True
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


@contextlib.asynccontextmanager
async def relayed(port: int) -> AsyncIterator[tuple[Relay, int]]:
    relay = Relay(port)
    server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
    try:
        yield relay, server.sockets[0].getsockname()[1]
    finally:
        relay.cut_now()
        server.close()


def test_an_unconfirmed_removal_is_resent_before_the_ip_is_reused(tmp_path):
    async def scenario() -> None:
        async with (
            running_plane(tmp_path, YAML) as plane,
            relayed(plane.grpc_port) as (relay, port),
        ):
            endpoint = ControlPlaneEndpoint.tls(f"127.0.0.1:{port}", root_file(tmp_path))
            async with ControlPlaneClient(
                endpoint, "node-1", TOKENS["node-1"], backoff=FAST_BACKOFF
            ) as client:
                await client.register_workload(
                    namespace="default", name="client", uid="uid-1", ips=["10.1.0.5"]
                )
                relay.cut_now()
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await client.deregister_workload(
                        namespace="default", name="client", uid="uid-1"
                    )
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert set(client.unconfirmed_removals) == {"uid-1"}
                assert "default/client" in plane.state.dump()["registrations"]

                relay.cut = False
                async with asyncio.timeout(10):
                    await client.channel.channel_ready()
                await client.register_workload(
                    namespace="default", name="client-2", uid="uid-2", ips=["10.1.0.5"]
                )
                registrations = plane.state.dump()["registrations"]
                assert "default/client" not in registrations
                assert registrations["default/client-2"]["ips"] == ["10.1.0.5"]
                assert client.unconfirmed_removals == {}

    asyncio.run(scenario())
