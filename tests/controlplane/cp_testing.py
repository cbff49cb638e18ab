"""Shared pieces for control plane tests: a mesh, a running control plane, a recording node."""

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

from google.protobuf.message import Message

from controlplane.app import ControlPlane, Settings
from controlplane.ca import load_or_create_root
from controlplane.client import XdsClient
from controlplane.metrics import Metrics
from controlplane.sources import FileSource
from node_agent.errors import InvalidInputError

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


@contextlib.asynccontextmanager
async def running_plane(
    tmp_path: Path, text: str = MESH_YAML, grpc_listen: str = "127.0.0.1:0"
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
        settings=Settings(grpc_listen=grpc_listen, http_listen="127.0.0.1:0"),
        metrics=metrics,
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
async def subscribed(
    plane: ControlPlane, node: str, handler: RecordingHandler
) -> AsyncIterator[XdsClient]:
    client = XdsClient(f"127.0.0.1:{plane.grpc_port}", node, TOKENS[node], handler)
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
