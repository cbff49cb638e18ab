"""A 50,000-workload mesh syncs through real gRPC: pushes are split, never one huge message.

gRPC's default limit (4 MiB) broke the initial sync at about 23,000 workloads.
"""

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from cp_testing import RecordingHandler, running
from google.protobuf.message import Message

from controlplane.app import ControlPlane, Settings
from controlplane.ca import ROOT_CERT_FILE, load_or_create_root
from controlplane.mesh import MeshConfig, NodeConfig, ServiceConfig
from controlplane.metrics import Metrics
from controlplane.xds_server import MAX_PUSH_BYTES
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import ControlPlaneClient
from node_agent.mesh_view import MeshView
from node_agent.proxy.model import MeshSnapshot
from node_agent.proxy.xds_source import SnapshotHandler
from weir_common import xds_transport
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.mesh import (
    RESOURCE_TYPES,
    SERVICE_TYPE,
    WORKLOAD_TYPE,
    auth_metadata,
    resource_name,
)
from weir_common.retry import Backoff

pytestmark = pytest.mark.timeout(240)

WORKLOADS = 50_000
NODES = 100
SERVICES = 100
# Bounds a wait on a shared, loaded machine; it measures nothing.
SYNC_TIMEOUT = 120.0


def token(node: int) -> str:
    return f"token-for-node-{node:04d}-0123456789"


def big_mesh() -> MeshConfig:
    workloads = {}
    for i in range(WORKLOADS):
        workload = mesh_pb2.Workload(
            name=f"w-{i}",
            namespace="bench",
            service_account=f"sa-{i % SERVICES}",
            node=f"node-{i % NODES}",
            ips=[f"10.{i // 65536 + 1}.{i // 256 % 256}.{i % 256}"],
            labels={"app": f"app-{i % SERVICES}"},
            captured=True,
        )
        workloads[resource_name(workload.namespace, workload.name)] = workload
    services = {}
    for s in range(SERVICES):
        service = mesh_pb2.Service(
            name=f"svc-{s}",
            namespace="bench",
            vips=[f"10.96.0.{s}"],
            ports=[mesh_pb2.ServicePort(port=80, target_port=8080)],
            endpoints=[f"bench/w-{i}" for i in range(s, WORKLOADS, SERVICES)],
        )
        services[resource_name("bench", service.name)] = ServiceConfig(service, {"app": f"app-{s}"})
    return MeshConfig(
        trust_domain="cluster.local",
        nodes={f"node-{n}": NodeConfig(f"node-{n}", token(n)) for n in range(NODES)},
        workloads=workloads,
        services=services,
        policies={},
    )


class FixedSource:
    def __init__(self, mesh: MeshConfig) -> None:
        self._mesh = mesh

    def load(self) -> MeshConfig:
        return self._mesh

    async def watch(self, publish: Callable[[MeshConfig], None]) -> None:
        await asyncio.Event().wait()


@pytest.fixture(scope="module")
def mesh() -> MeshConfig:
    return big_mesh()


@contextlib.asynccontextmanager
async def big_plane(tmp_path: Path, mesh: MeshConfig) -> AsyncIterator[ControlPlane]:
    ca = load_or_create_root(
        tmp_path / "state", mesh.trust_domain, now=datetime.datetime.now(datetime.UTC)
    )
    plane = ControlPlane(
        source=FixedSource(mesh),
        mesh=mesh,
        ca=ca,
        settings=Settings(grpc_listen="127.0.0.1:0", http_listen=None),
        metrics=Metrics(),
    )
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop(grace=0.5)


def endpoint(plane: ControlPlane, tmp_path: Path) -> ControlPlaneEndpoint:
    return ControlPlaneEndpoint.tls(
        f"127.0.0.1:{plane.grpc_port}", tmp_path / "state" / ROOT_CERT_FILE
    )


class WatchedView(MeshView):
    """The agent's view, noting how many workloads it held when it first said synced."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.workloads_when_synced: int | None = None
        self.done = asyncio.Event()

    def apply(
        self,
        type_url: str,
        resources: Mapping[str, Message],
        updated: Sequence[str],
        removed: Sequence[str],
    ) -> None:
        super().apply(type_url, resources, updated, removed)
        if self.synced and self.workloads_when_synced is None:
            self.workloads_when_synced = len(self.workloads())
            self.done.set()


def test_a_50k_workload_initial_sync_reaches_the_agent_and_the_proxy_whole(tmp_path, mesh):
    view = WatchedView("node-7")
    snapshots: list[MeshSnapshot] = []
    first_snapshot = asyncio.Event()

    def publish(snapshot: MeshSnapshot) -> None:
        snapshots.append(snapshot)
        first_snapshot.set()

    async def scenario() -> float:
        async with (
            big_plane(tmp_path, mesh) as plane,
            ControlPlaneClient(endpoint(plane, tmp_path), "node-7", token(7)) as agent,
            ControlPlaneClient(endpoint(plane, tmp_path), "node-7", token(7)) as proxy,
        ):
            start = time.monotonic()
            async with (
                running(agent.subscribe(view)),
                running(proxy.subscribe(SnapshotHandler(publish))),
            ):
                async with asyncio.timeout(SYNC_TIMEOUT):
                    await view.done.wait()
                    await first_snapshot.wait()
            return time.monotonic() - start

    elapsed = asyncio.run(scenario())
    print(f"50k-workload initial sync, agent view and proxy snapshot: {elapsed:.1f} s")
    # Complete from the moment each calls itself synced, not filled in afterwards.
    assert view.workloads_when_synced == WORKLOADS
    assert len(snapshots[0].workloads) == WORKLOADS
    assert len(snapshots[0].services["bench/svc-3"].endpoints) == WORKLOADS // SERVICES


def test_no_push_exceeds_the_budget_so_a_default_grpc_client_syncs_too(tmp_path, mesh):
    """A client with gRPC's default limits (4 MiB) gets the whole mesh in bounded messages."""

    async def scenario() -> tuple[int, list[int], set[str]]:
        async with big_plane(tmp_path, mesh) as plane:
            roots = (tmp_path / "state" / ROOT_CERT_FILE).read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            largest = max(
                len(e.fragment) for e in plane.state.snapshot.view(WORKLOAD_TYPE).values()
            )
            sizes: list[int] = []
            first_seen: list[str] = []
            names: set[str] = set()
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{plane.grpc_port}", credentials
            ) as channel:
                call = channel.stream_stream(
                    xds_transport.DELTA_METHOD,
                    request_serializer=xds_transport.passthrough,
                    response_deserializer=xds_transport.passthrough,
                )(metadata=auth_metadata(token(7)))
                for type_url in RESOURCE_TYPES:
                    await call.write(
                        xds_transport.encode_request(node_id="node-7", type_url=type_url)
                    )
                async with asyncio.timeout(SYNC_TIMEOUT):
                    while not (
                        len(names) == WORKLOADS and len(set(first_seen)) == len(RESOURCE_TYPES)
                    ):
                        data = await call.read()
                        assert data is not grpc.aio.EOF
                        response = xds_transport.decode_response(data)
                        sizes.append(len(data))
                        first_seen.append(response.type_url)
                        if response.type_url == WORKLOAD_TYPE:
                            # Every type's first push waits until the split one is through.
                            assert set(first_seen) <= {WORKLOAD_TYPE, RESOURCE_TYPES[0]}
                            names.update(r.name for r in response.resources)
                        await call.write(
                            xds_transport.encode_request(
                                node_id="node-7",
                                type_url=response.type_url,
                                response_nonce=response.nonce,
                            )
                        )
                call.cancel()
            return largest, sizes, names

    largest, sizes, names = asyncio.run(scenario())
    print(f"{len(sizes)} responses, largest {max(sizes)} bytes, total {sum(sizes)} bytes")
    assert len(names) == WORKLOADS
    assert max(sizes) <= MAX_PUSH_BYTES + largest + 1024
    assert sum(sizes) > 4 * 1024 * 1024  # unsplit, it would not have fitted in one message


def test_one_resource_over_grpc_default_limit_still_reaches_the_node(tmp_path):
    """The limits themselves: a resource is never split, so the channel must take it."""
    endpoints = [f"big/w-{i:06d}" for i in range(350_000)]  # ~5 MiB in one Service
    service = mesh_pb2.Service(
        name="huge", namespace="big", vips=["10.96.9.9"], endpoints=endpoints
    )
    mesh = MeshConfig(
        trust_domain="cluster.local",
        nodes={"node-1": NodeConfig("node-1", token(1))},
        workloads={},
        services={"big/huge": ServiceConfig(service, {"app": "huge"})},
        policies={},
    )
    handler = RecordingHandler()

    async def scenario() -> None:
        async with (
            big_plane(tmp_path, mesh) as plane,
            ControlPlaneClient(endpoint(plane, tmp_path), "node-1", token(1)) as client,
            running(client.subscribe(handler)),
        ):
            size = len(plane.state.snapshot.view(SERVICE_TYPE)["big/huge"].fragment)
            assert size > 4 * 1024 * 1024
            await handler.wait_for(lambda: SERVICE_TYPE in handler.states, timeout=SYNC_TIMEOUT)

    asyncio.run(scenario())
    assert list(handler.states[SERVICE_TYPE]["big/huge"].endpoints) == endpoints


def test_a_resume_request_over_grpc_default_limit_is_accepted(tmp_path, mesh):
    """A reconnecting node lists every version it holds in one request."""
    held = {f"bench/gone-{i:06d}": "0123456789abcdef" for i in range(200_000)}

    async def scenario() -> xds_transport.DeltaResponse:
        async with big_plane(tmp_path, mesh) as plane:
            request = xds_transport.encode_request(
                node_id="node-7", type_url=WORKLOAD_TYPE, initial_versions=held
            )
            assert len(request) > 4 * 1024 * 1024
            async with endpoint(plane, tmp_path).open_channel(Backoff()) as channel:
                call = channel.stream_stream(
                    xds_transport.DELTA_METHOD,
                    request_serializer=xds_transport.passthrough,
                    response_deserializer=xds_transport.decode_response,
                )(metadata=auth_metadata(token(7)))
                await call.write(request)
                async with asyncio.timeout(SYNC_TIMEOUT):
                    response = await call.read()
                call.cancel()
            assert response is not grpc.aio.EOF
            return response

    response = asyncio.run(scenario())
    # The names it holds that the mesh lacks are removed, in parts like any push.
    assert response.type_url == WORKLOAD_TYPE
    assert set(response.removed_resources) <= set(held)
    assert response.removed_resources
