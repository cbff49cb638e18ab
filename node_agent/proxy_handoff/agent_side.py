"""The agent's end of the handoff: serve enrolled pods to every connected proxy.

A pod counts as handed over only when every connected proxy acknowledged it
(its listeners exist in the pod netns). With no proxy connected, handing a
pod over fails: the CNI ADD that asked for it fails closed and the runtime
retries, rather than starting a pod whose captured traffic has nowhere to go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node_agent.constants import PROXY_GID, PROXY_UID
from node_agent.netns import Netns
from node_agent.proxy_handoff import protocol
from node_agent.proxy_handoff.listener_migration import ListenerMigration
from node_agent.proxy_handoff.protocol import EnrolledPod
from node_agent.unix_sockets import bind_private, peer_credentials
from weir_common.errors import TransientError
from weir_common.supervision import Supervisor

log = logging.getLogger(__name__)

Snapshot = Callable[[], list[tuple[EnrolledPod, Netns]]]


class HandoffError(TransientError):
    """No proxy took the pod (none connected, a nack, or no ack in time)."""


class ProxyGoneError(HandoffError):
    """The proxy's connection ended before it answered: it is no longer one to wait for."""


@dataclass
class _Pending:
    message: dict[str, Any]
    netns: Netns | None
    done: asyncio.Future[None]


@dataclass
class _ProxyConnection:
    sock: socket.socket
    peer_pid: int
    queue: asyncio.Queue[_Pending] = field(default_factory=asyncio.Queue)
    synced: bool = False
    version: int = 0  # from its hello
    # Its proxy's workers say the same group (version 3); any other proxy is a group of its own.
    group: str = ""
    workers: int = 1
    order: int = 0  # connection order: a group whose first connection came later is a successor
    connected_at: float = field(default_factory=time.time)
    # (connected, synced) successors last sent, so unchanged counts are not resent.
    told: tuple[int, int] = (0, 0)


class ProxyHandoffServer:
    """Serves a snapshot then every change to each proxy, one acked message at a time."""

    def __init__(
        self,
        path: Path,
        snapshot: Snapshot,
        ack_timeout: float = 5.0,
        on_synced: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.path = path
        self._snapshot = snapshot
        self._on_synced = on_synced
        self._ack_timeout = ack_timeout
        self._connections: list[_ProxyConnection] = []
        self._lock = asyncio.Lock()
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._connection_order = 0
        self._migration = ListenerMigration()

    @property
    def synced_proxies(self) -> int:
        """Proxies that hold the full snapshot (what readiness reports)."""
        return sum(c.synced for c in self._connections)

    def dump(self) -> list[dict[str, object]]:
        """The connected proxies, oldest first (the admin `proxies` section)."""
        return [
            {
                "pid": c.peer_pid,
                "protocol_version": c.version,
                "group": c.group,
                "workers": c.workers,
                "synced": c.synced,
                "connected_since": c.connected_at,
            }
            for c in sorted(self._connections, key=lambda c: c.order)
        ]

    async def start(self, supervisor: Supervisor | None = None) -> None:
        """Listen; the accept loop runs under `supervisor` when given (see supervision)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            # Root and the proxy's UID only: the proxy connects as 1337.
            bind_private(sock, self.path, 0o600, owner=(PROXY_UID, PROXY_GID), backlog=8)
        except BaseException:
            sock.close()
            raise
        self.path.parent.chmod(0o711)
        self._listener = sock
        if supervisor is None:
            self._spawn(self._accept_loop(sock))
        else:
            supervisor.start("proxy handoff", lambda: self._accept_loop(sock))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._connections:
            conn.sock.close()
        self._connections.clear()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def add(self, pod: EnrolledPod, netns: Netns) -> None:
        """Hand `pod` to every connected proxy; returns once all acked."""
        await self._enable_migration(netns)
        await self._broadcast({"type": "add", "pod": pod.to_json()}, netns, f"pod {pod.uid}")

    async def _enable_migration(self, netns: Netns) -> None:
        # In a worker thread: while a thread is inside the pod's netns,
        # /proc/self/ns/net (the main thread's) must keep naming the node's.
        await asyncio.to_thread(self._migration.enable, netns)

    async def remove(self, uid: str) -> None:
        await self._broadcast({"type": "remove", "uid": uid}, None, f"removal of pod {uid}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _broadcast(self, message: dict[str, Any], netns: Netns | None, what: str) -> None:
        async with self._lock:
            targets = list(self._connections)
            if not targets:
                raise HandoffError(f"no node proxy is connected to take {what}")
            pending = [self._enqueue(conn, dict(message), netns) for conn in targets]
        results = await asyncio.gather(*(p.done for p in pending), return_exceptions=True)
        # A proxy that went away meanwhile (the old one of a rolling update) is
        # no longer connected, so its answer is not needed; a refusal or a
        # missing ack of one still there is.
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        gone = [r for r in results if isinstance(r, ProxyGoneError)]
        if len(gone) < len(errors) or len(gone) == len(results):
            raise HandoffError(f"{what} not taken: {'; '.join(errors)}")

    def _enqueue(
        self, conn: _ProxyConnection, message: dict[str, Any], netns: Netns | None
    ) -> _Pending:
        self._seq += 1
        message["seq"] = self._seq
        item = _Pending(message, netns, asyncio.get_running_loop().create_future())
        item.done.add_done_callback(_log_failure)
        conn.queue.put_nowait(item)
        return item

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            pid, uid, _gid = peer_credentials(sock)
            if uid not in (0, PROXY_UID):
                log.warning("refused handoff connection from pid %d uid %d", pid, uid)
                sock.close()
                continue
            self._spawn(self._serve(_ProxyConnection(sock, pid)))

    async def _serve(self, conn: _ProxyConnection) -> None:
        try:
            hello, fds = await asyncio.wait_for(protocol.recv(conn.sock), self._ack_timeout)
            for fd in fds:
                os.close(fd)
            said = protocol.expect_hello(hello)
            conn.version, conn.workers = said.version, said.workers
            async with self._lock:
                for pod, netns in self._snapshot():
                    # Again for pods enrolled by an agent that did not set it.
                    await self._enable_migration(netns)
                    self._enqueue(conn, {"type": "add", "pod": pod.to_json()}, netns)
                snapshot_done = self._enqueue(conn, {"type": "snapshot_done"}, None)
                self._connection_order += 1
                conn.order = self._connection_order
                conn.group = said.group if said.group is not None else f"#{conn.order}"
                self._connections.append(conn)
                self._tell_successors()
            log.info("proxy pid %d connected; sending snapshot", conn.peer_pid)
            self._spawn(self._mark_synced(conn, snapshot_done))
            await self._pump(conn)
        except (ConnectionError, TimeoutError, protocol.ProtocolError, OSError) as e:
            log.warning("proxy pid %d handoff connection ended: %s", conn.peer_pid, e)
        finally:
            await self._drop(conn)

    async def _mark_synced(self, conn: _ProxyConnection, snapshot_done: _Pending) -> None:
        with contextlib.suppress(Exception):
            await snapshot_done.done
            conn.synced = True
        if conn.synced:
            async with self._lock:
                self._tell_successors()
            if self._on_synced is not None:
                await self._on_synced()

    def _tell_successors(self) -> None:
        """Tell each proxy what it needs to hand over on its way out (caller holds the lock)."""
        groups = successor_groups(self._connections)
        for conn in self._connections:
            if conn.version < 2:
                continue
            counts = groups[conn.group]
            if counts != conn.told:
                conn.told = counts
                message = {"type": "successors", "connected": counts[0], "synced": counts[1]}
                self._enqueue(conn, message, None)

    async def _pump(self, conn: _ProxyConnection) -> None:
        while True:
            item = await conn.queue.get()
            try:
                await self._deliver(conn, item)
            except BaseException as e:
                if not item.done.done():
                    reason = str(e) or type(e).__name__
                    kind = ProxyGoneError if isinstance(e, ConnectionError) else HandoffError
                    item.done.set_exception(kind(f"proxy pid {conn.peer_pid}: {reason}"))
                raise

    async def _deliver(self, conn: _ProxyConnection, item: _Pending) -> None:
        try:
            fd = os.open(item.netns.path, os.O_RDONLY | os.O_CLOEXEC) if item.netns else None
        except OSError as e:
            # This pod's netns is gone (or unreadable): fail it alone. Raising would
            # end the connection, and the proxy's reconnect would meet it again.
            uid = item.message["pod"]["uid"]
            item.done.set_exception(HandoffError(f"cannot open the netns of pod {uid}: {e}"))
            return
        try:
            await protocol.send(conn.sock, item.message, [fd] if fd is not None else None)
        finally:
            if fd is not None:
                os.close(fd)
        try:
            reply, fds = await asyncio.wait_for(protocol.recv(conn.sock), self._ack_timeout)
        except TimeoutError:
            raise TimeoutError(f"no ack within {self._ack_timeout}s") from None
        for extra in fds:
            os.close(extra)
        if reply.get("seq") != item.message["seq"]:
            raise protocol.ProtocolError(
                f"ack for seq {reply.get('seq')}, expected {item.message['seq']}"
            )
        if reply.get("type") == "ack":
            item.done.set_result(None)
        else:
            error = reply.get("error", reply)
            item.done.set_exception(HandoffError(f"proxy pid {conn.peer_pid}: {error}"))

    async def _drop(self, conn: _ProxyConnection) -> None:
        async with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
                self._tell_successors()
        conn.sock.close()
        while not conn.queue.empty():
            item = conn.queue.get_nowait()
            if not item.done.done():
                item.done.set_exception(ProxyGoneError(f"proxy pid {conn.peer_pid} disconnected"))


class _GroupMember(Protocol):
    group: str
    workers: int
    order: int
    synced: bool


def successor_groups(connections: Sequence[_GroupMember]) -> dict[str, tuple[int, int]]:
    """Per group: how many groups came after it, and how many of those hold every pod.

    A group came after another if its first connection did; it holds every
    pod once as many of its workers as it declared are synced.
    """
    first: dict[str, int] = {}
    workers: dict[str, int] = {}
    synced: dict[str, int] = {}
    for conn in connections:
        first[conn.group] = min(first.get(conn.group, conn.order), conn.order)
        workers[conn.group] = max(workers.get(conn.group, 1), conn.workers)
        synced[conn.group] = synced.get(conn.group, 0) + conn.synced
    complete = {group for group, count in synced.items() if count >= workers[group]}
    return {
        group: (
            sum(1 for other in first if first[other] > order),
            sum(1 for other in complete if first[other] > order),
        )
        for group, order in first.items()
    }


def _log_failure(done: asyncio.Future[None]) -> None:
    # Snapshot items have no waiter; their failures are reported here, once.
    if not done.cancelled() and done.exception() is not None:
        log.warning("handoff: %s", done.exception())
