"""Shared pieces for control plane tests: a mesh, a running control plane, a recording node."""

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

from google.protobuf.message import Message

from controlplane.app import ControlPlane, Settings
from controlplane.ca import ROOT_CERT_FILE, load_or_create_root
from controlplane.metrics import Metrics
from controlplane.sources import FileSource
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import ControlPlaneClient, XdsClient
from weir_common.errors import InvalidInputError
from weir_common.retry import Backoff

MESH_YAML = """
trustDomain: cluster.local
nodes:
  - {name: node-1, bootstrapToken: token-node-1-0123456789}
  - {name: node-2, bootstrapToken: token-node-2-0123456789}
workloads:
  - {name: client, namespace: default, serviceAccount: client, node: node-1, labels: {app: client}}
  - {name: server, namespace: default, serviceAccount: server, node: node-2, labels: {app: server}}
services:
  - name: server
    namespace: default
    vips: [10.96.0.10]
    selector: {app: server}
    ports: [{port: 80, targetPort: 8080}]
authorizationPolicies:
  - name: server-allow-client
    namespace: default
    selector: {app: server}
    action: ALLOW
    rules: [{sourcePrincipals: [spiffe://cluster.local/ns/default/sa/client]}]
"""
TOKENS = {"node-1": "token-node-1-0123456789", "node-2": "token-node-2-0123456789"}
STEP_TIMEOUT = 5.0
# Tests restart control planes; reconnect quickly.
FAST_BACKOFF = Backoff(initial=0.05, maximum=0.5)


def root_file(tmp_path: Path) -> Path:
    """The mesh root the control plane of `running_plane(tmp_path)` generated."""
    return tmp_path / "state" / ROOT_CERT_FILE


def endpoint(plane: ControlPlane, tmp_path: Path) -> ControlPlaneEndpoint:
    return ControlPlaneEndpoint.tls(f"127.0.0.1:{plane.grpc_port}", root_file(tmp_path))


@contextlib.asynccontextmanager
async def node_client(
    plane: ControlPlane, tmp_path: Path, node: str
) -> AsyncIterator[ControlPlaneClient]:
    async with ControlPlaneClient(
        endpoint(plane, tmp_path), node, TOKENS[node], backoff=FAST_BACKOFF
    ) as client:
        yield client


@contextlib.asynccontextmanager
async def running_plane(
    tmp_path: Path,
    text: str = MESH_YAML,
    grpc_listen: str = "127.0.0.1:0",
    settings: Settings | None = None,
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
) -> AsyncIterator[ControlPlane]:
    config = tmp_path / "mesh.yaml"
    config.write_text(text)
    metrics = Metrics()
    source = FileSource(config, metrics, interval=0.05)
    mesh = source.load()
    ca = load_or_create_root(
        tmp_path / "state", mesh.trust_domain, now=datetime.datetime.now(datetime.UTC)
    )
    plane = ControlPlane(
        source=source,
        mesh=mesh,
        ca=ca,
        settings=settings or Settings(grpc_listen=grpc_listen, http_listen="127.0.0.1:0"),
        metrics=metrics,
        clock=clock,
    )
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop(grace=0.5)


class RecordingHandler:
    """Keeps every state the client accepted; rejects what `reject` says to."""

    def __init__(
        self, reject: Callable[[str, Mapping[str, Message]], str | None] = lambda *_: None
    ):
        self.states: dict[str, dict[str, Message]] = {}
        self.updates: list[tuple[str, list[str], list[str]]] = []
        self.changed = asyncio.Event()
        self._reject = reject

    def apply(
        self,
        type_url: str,
        resources: Mapping[str, Message],
        updated: Sequence[str],
        removed: Sequence[str],
    ) -> None:
        reason = self._reject(type_url, resources)
        if reason is not None:
            raise InvalidInputError(reason)
        self.states[type_url] = dict(resources)
        self.updates.append((type_url, list(updated), list(removed)))
        self.changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def running(client: XdsClient) -> AsyncIterator[XdsClient]:
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def subscribed(
    plane: ControlPlane, tmp_path: Path, node: str, handler: RecordingHandler
) -> AsyncIterator[XdsClient]:
    async with (
        node_client(plane, tmp_path, node) as client,
        running(client.subscribe(handler)) as xds,
    ):
        yield xds
