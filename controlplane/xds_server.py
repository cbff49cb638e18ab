"""Delta ADS server: pushes snapshots to node agents.

One stream per node agent. A stream authenticates once (metadata bearer
token), then for each type URL the client subscribes to: the initial state
(minus what the client says it already has, so a reconnecting client resumes),
then one delta per change, at most one unacknowledged push per type, none
larger than MAX_PUSH_BYTES (a larger one is split, see delta.py). A NACK
leaves the node on its previous config; the server counts and logs it, and
does not offer that content again until it changes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from controlplane import metrics as m
from controlplane.auth import NodeAuthenticator, RequestRefusedError
from controlplane.delta import Subscription
from controlplane.snapshot import EMPTY, Snapshot, changed_names
from weir_common import xds_transport
from weir_common.mesh import RESOURCE_TYPES
from weir_common.xds_transport import DeltaRequest

log = logging.getLogger(__name__)

# A node agent subscribes to a handful of types; more on one stream is abuse.
MAX_TYPES_PER_STREAM: Final = 16
# A full push (initial sync, resync) carries the whole mesh: ~1.7 MB at 10,000
# workloads. gRPC accepts a message at once and buffers it until the node has
# read it, so when 1,000 nodes connected together the control plane held all
# their initial pushes at once (1.5 GB). At most this many full pushes are
# unacknowledged at a time; the work is CPU-bound, so this costs no throughput.
FULL_PUSH_SLOTS: Final = 16
# A node that does not acknowledge its full push gives its slot up after this
# long, so a few stuck clients cannot hold back every other node's sync.
FULL_PUSH_SLOT_SECONDS: Final = 5.0
# A push holds at most this many bytes of resources (or one resource, if larger);
# the rest follows in further pushes of the same type, each sent once the
# previous one is answered. 1 MiB is ~6,000 workloads: a 50,000-workload sync
# is 9 messages, each far below any gRPC limit (4 MiB by default).
MAX_PUSH_BYTES: Final = 1024 * 1024
# gRPC's limit on one message, both ways, here and in the node's client. Well
# above MAX_PUSH_BYTES, for a single large resource; requests are bounded by the
# reconnect request listing every resource version held (~2 MiB at 50,000).
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


@dataclass(eq=False)
class _Stream:
    node: str
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    # Per type URL: when the oldest change not yet pushed was made.
    changed_at: dict[str, float] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Gives back the full-push slot this stream holds until its pushes are answered.
    release_slot: Callable[[], None] | None = None
    failure: tuple[grpc.StatusCode, str] | None = None
    closed: bool = False

    def resyncing(self) -> bool:
        """Whether some type has a full push (initial sync or resync), or the rest of a
        push that was split, still to send."""
        return any(
            sub.pending is None and (sub.dirty is None or sub.partial)
            for sub in self.subscriptions.values()
        )

    def splitting(self) -> bool:
        return any(sub.partial for sub in self.subscriptions.values())

    def answered(self) -> bool:
        """Whether the node has ACKed or NACKed every push sent to it."""
        return all(sub.pending is None for sub in self.subscriptions.values())

    def dump(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "subscriptions": {
                type_url: {
                    "wildcard": sub.wildcard,
                    "names": sorted(sub.names),
                    # Resources held as in the shared base, and where the node differs.
                    "shares_base": len(sub.base),
                    "overlay": len(sub.overlay),
                    "pending_nonce": sub.pending.nonce if sub.pending else None,
                    "rejected": dict(sub.rejected),
                }
                for type_url, sub in self.subscriptions.items()
            },
        }


class DistributionServer:
    """Holds the snapshot being served and every node stream."""

    def __init__(
        self,
        authenticator: NodeAuthenticator,
        metrics: m.Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._authenticator = authenticator
        self._metrics = metrics
        self._clock = clock
        self._snapshot = EMPTY
        self._streams: set[_Stream] = set()
        self._nonces = itertools.count(1)
        self._full_push_slots = asyncio.Semaphore(FULL_PUSH_SLOTS)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def publish(self, snapshot: Snapshot) -> None:
        """Serve `snapshot` from now on and wake the streams it changes."""
        changes = changed_names(self._snapshot, snapshot)
        self._snapshot = snapshot
        self._metrics.set(m.SNAPSHOT_GENERATION, snapshot.generation)
        for stream in self._streams:
            woken = False
            for type_url, sub in stream.subscriptions.items():
                names = changes.get(type_url)
                if names:
                    sub.mark_dirty(names)
                    stream.changed_at.setdefault(type_url, snapshot.created_at)
                    woken = True
            if woken:
                stream.wake.set()

    def connected_nodes(self) -> list[str]:
        return sorted(stream.node for stream in self._streams)

    def dump(self) -> list[dict[str, Any]]:
        return sorted((s.dump() for s in self._streams), key=lambda d: str(d["node"]))

    def handler(self) -> grpc.GenericRpcHandler[DeltaRequest, bytes]:
        return grpc.method_handlers_generic_handler(
            xds_transport.ADS_SERVICE,
            {
                xds_transport.DELTA_METHOD_NAME: grpc.stream_stream_rpc_method_handler(
                    self._serve,
                    request_deserializer=xds_transport.decode_request,
                    response_serializer=xds_transport.passthrough,
                )
            },
        )

    async def _serve(
        self,
        requests: AsyncIterator[DeltaRequest],
        context: grpc.aio.ServicerContext[DeltaRequest, bytes],
    ) -> None:
        try:
            node = await self._authenticator.authenticate(context.invocation_metadata() or ())
        except RequestRefusedError as refusal:
            await context.abort(refusal.code, refusal.message)
        stream = _Stream(node)
        self._streams.add(stream)
        self._metrics.set(m.CONNECTED_NODES, len(self._streams))
        log.info("node %s connected", node)
        reader = asyncio.create_task(self._read(stream, requests))
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.failure is not None:
                    await context.abort(*stream.failure)
                if stream.closed:
                    return
                if stream.resyncing() and stream.release_slot is None:
                    stream.release_slot = await self._full_push_slot()
                # Written and dropped, never left in a variable (nor in gRPC's
                # loop over an async generator): the last push of a stream,
                # after an initial sync the whole mesh, would stay alive while
                # the stream idles until the next change.
                responses = self._pushes(stream)
                while responses:
                    await context.write(responses.pop(0))
        finally:
            reader.cancel()
            if stream.release_slot is not None:
                stream.release_slot()
            self._streams.discard(stream)
            self._metrics.set(m.CONNECTED_NODES, len(self._streams))
            log.info("node %s disconnected", node)

    async def _full_push_slot(self) -> Callable[[], None]:
        """Take a slot; the function returned gives it back (at most once)."""
        await self._full_push_slots.acquire()
        loop = asyncio.get_running_loop()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                timer.cancel()
                self._full_push_slots.release()

        timer = loop.call_later(FULL_PUSH_SLOT_SECONDS, release)
        return release

    def _pushes(self, stream: _Stream) -> list[bytes]:
        responses = []
        for type_url, sub in stream.subscriptions.items():
            if sub.pending is not None:
                continue
            if sub.initial and stream.splitting():
                # A node counts its config complete once every type has arrived
                # (MeshView.synced, the proxy's first snapshot): so a type's first
                # push waits until a split one is through.
                continue
            delta = sub.next_push(self._snapshot.view(type_url), MAX_PUSH_BYTES)
            changed_at = stream.changed_at.pop(type_url, None)
            if delta is None:
                continue
            nonce = str(next(self._nonces))
            sub.sent(nonce, delta)
            responses.append(
                xds_transport.encode_response(
                    type_url=type_url,
                    nonce=nonce,
                    system_version=str(self._snapshot.generation),
                    fragments=(entry.fragment for entry in delta.updated),
                    removed=delta.removed,
                )
            )
            self._metrics.inc(m.PUSHES, type_url=type_url)
            if changed_at is not None:
                self._metrics.observe(m.PUSH_LATENCY, self._clock() - changed_at)
        return responses

    async def _read(self, stream: _Stream, requests: AsyncIterator[DeltaRequest]) -> None:
        try:
            async for request in requests:
                failure = self._handle(stream, request)
                if failure is not None:
                    stream.failure = failure
                    break
                if stream.release_slot is not None and stream.answered() and not stream.resyncing():
                    stream.release_slot()
                    stream.release_slot = None
                stream.wake.set()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.debug("stream of node %s ended: %s", stream.node, exc)
        finally:
            stream.closed = True
            stream.wake.set()

    def _handle(self, stream: _Stream, request: DeltaRequest) -> tuple[grpc.StatusCode, str] | None:
        if request.node.id and request.node.id != stream.node:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"authenticated as node {stream.node!r} but request names node {request.node.id!r}",
            )
        type_url = request.type_url
        sub = stream.subscriptions.get(type_url)
        if sub is None:
            if len(stream.subscriptions) >= MAX_TYPES_PER_STREAM:
                return (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {MAX_TYPES_PER_STREAM} type URLs on one stream",
                )
            if type_url not in RESOURCE_TYPES:
                log.warning("node %s subscribed to unknown type %r", stream.node, type_url)
            stream.subscriptions[type_url] = Subscription.open(
                stream.node, request.resource_names_subscribe, request.initial_resource_versions
            )
            return None
        nonce = request.response_nonce
        if nonce and request.HasField("error_detail"):
            if sub.reject(nonce):
                self._metrics.inc(m.NACKS, type_url=type_url)
                log.warning(
                    "node %s rejected %s push %s: %s",
                    stream.node,
                    type_url,
                    nonce,
                    request.error_detail.message,
                )
        elif nonce:
            sub.acknowledge(nonce)
        sub.update_interest(request.resource_names_subscribe, request.resource_names_unsubscribe)
        return None
