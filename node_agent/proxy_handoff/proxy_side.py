"""The proxy's end of the handoff: follow the agent's pods, survive its restarts.

The client keeps each pod's netns fd open for as long as the pod is known,
so the namespace stays reachable (as /proc/self/fd/N) even after the runtime
unmounts it. On every (re)connect the agent resends its whole snapshot; pods
the proxy still holds but the snapshot no longer lists were removed while
the connection was down, and are removed here when `snapshot_done` arrives.

A pod the handler cannot take is nacked, with the reason, and the session goes
on: ending it would make the agent replay its snapshot, which fails on the same
pod again, so one bad pod would keep every other pod from being handed over.
Only the protocol or the socket failing ends a session.

The agent also says how many proxies connected after this one and hold
every pod (`successors`): `hand_over` waits for one before this proxy
closes its listeners, so an upgrade loses no connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from node_agent.netns import Netns
from node_agent.proxy_handoff import protocol
from node_agent.proxy_handoff.protocol import EnrolledPod
from weir_common.errors import WeirError
from weir_common.retry import Backoff

log = logging.getLogger(__name__)

# The agent is on the same node: it is back within moments of a restart, and
# a refused connect on a Unix socket costs next to nothing, so try often:
# until the proxy is back in touch, no pod can be enrolled on the node.
RECONNECT_BACKOFF: Final = Backoff(initial=0.05, maximum=0.5)


class PodHandler(Protocol):
    """What the proxy does with pods. Both calls must be idempotent.

    The Netns handed to add_pod stays valid until remove_pod for that uid, or
    an add_pod for it with another namespace. A call that raises (a WeirError
    saying why, ideally) refuses that one pod and leaves the others alone.
    """

    async def add_pod(self, pod: EnrolledPod, netns: Netns) -> None: ...

    async def remove_pod(self, uid: str) -> None: ...


@dataclass(frozen=True)
class Successors:
    """Proxies that connected to the agent after this one; `synced` of them hold every pod."""

    connected: int = 0
    synced: int = 0


@dataclass(frozen=True)
class Handover:
    """How a stopping proxy's wait for its successor ended."""

    handed_over: bool
    detail: str


class ProxyHandoffClient:
    """`hello` says which proxy this is: a worker of a group says its group (see protocol)."""

    def __init__(
        self,
        path: Path,
        handler: PodHandler,
        backoff: Backoff = RECONNECT_BACKOFF,
        hello: protocol.Hello = protocol.SINGLE_PROCESS_HELLO,
    ) -> None:
        self.path = path
        self._handler = handler
        self._backoff = backoff
        self._hello = hello
        self._fds: dict[str, int] = {}
        # Set once the first full snapshot is applied; readiness waits on it.
        self.synced = asyncio.Event()
        self.successors = Successors()
        self._successors_changed = asyncio.Condition()

    @property
    def pods(self) -> list[str]:
        return sorted(self._fds)

    async def run(self) -> None:
        """Connect, follow, reconnect with backoff; cancel to stop."""
        failures = 0
        try:
            while True:
                try:
                    await self._session()
                except (OSError, ConnectionError, protocol.ProtocolError) as e:
                    log.warning("handoff from agent at %s interrupted: %s", self.path, e)
                else:
                    failures = 0
                await asyncio.sleep(self._backoff.delay(failures))
                failures += 1
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    async def _session(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(self.path))
            await protocol.send(sock, self._hello.to_json())
            in_snapshot: set[str] | None = set()
            # A new session (the agent restarted) says it afresh if there are any.
            await self._set_successors(Successors())
            while True:
                message, fds = await protocol.recv(sock)
                reply: dict[str, Any] = {"seq": message.get("seq"), "type": "ack"}
                try:
                    in_snapshot = await self._apply(message, fds, in_snapshot)
                except _PodRefusedError as e:
                    reply = {"seq": message.get("seq"), "type": "nack", "error": e.reason}
                await protocol.send(sock, reply)
        finally:
            sock.close()

    async def _apply(
        self, message: dict[str, Any], fds: list[int], in_snapshot: set[str] | None
    ) -> set[str] | None:
        """Raises ProtocolError for a message that is not the protocol, _PodRefusedError for a pod
        the handler would not take."""
        kind = message["type"]
        _refuse_stray_fds(kind, fds)
        if kind == "add":
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise protocol.ProtocolError(f"add message with {len(fds)} fds instead of 1")
            try:
                pod = EnrolledPod.from_json(message.get("pod"))
            except protocol.ProtocolError:
                os.close(fds[0])
                raise
            await _refusable(f"pod {pod.uid}", self._add(pod, fds[0]))
            if in_snapshot is not None:
                in_snapshot.add(pod.uid)
        elif kind == "remove":
            uid = message.get("uid")
            if not isinstance(uid, str) or not uid:
                raise protocol.ProtocolError(f"remove message without a uid: {message}")
            await _refusable(f"removal of pod {uid}", self._remove(uid))
        elif kind == "successors":
            await self._set_successors(_successors(message))
        elif kind == "snapshot_done":
            for uid in set(self._fds) - (in_snapshot or set()):
                log.info("pod %s is gone from the agent's snapshot; removing", uid)
                await _refusable(f"removal of pod {uid}", self._remove(uid))
            self.synced.set()
            return None
        else:
            raise protocol.ProtocolError(f"unknown handoff message type {kind!r}")
        return in_snapshot

    async def hand_over(self, *, await_connect: float, await_sync: float) -> Handover:
        """Wait until a successor holds every pod; say how the wait ended.

        With none connected, wait up to `await_connect` seconds for one (on
        Kubernetes the old proxy may be told to stop before its successor
        reached the agent); then up to `await_sync` for one to hold every pod.
        """
        started = time.monotonic()
        async with self._successors_changed:
            if await_connect > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._successors_changed.wait_for(lambda: self.successors.connected > 0),
                        await_connect,
                    )
            if self.successors.connected == 0:
                return Handover(False, "no successor proxy connected: closing the listeners now")
            try:
                await asyncio.wait_for(
                    self._successors_changed.wait_for(lambda: self.successors.synced > 0),
                    await_sync,
                )
            except TimeoutError:
                return Handover(
                    False, f"no successor proxy held every pod within {await_sync:.1f} s"
                )
        waited = time.monotonic() - started
        return Handover(True, f"a successor proxy holds every pod (after {waited:.2f} s)")

    async def _set_successors(self, successors: Successors) -> None:
        if successors == self.successors:
            return
        log.info(
            "successor proxies: %d connected, %d holding every pod",
            successors.connected,
            successors.synced,
        )
        async with self._successors_changed:
            self.successors = successors
            self._successors_changed.notify_all()

    async def _add(self, pod: EnrolledPod, fd: int) -> None:
        old = self._fds.get(pod.uid)
        if old is not None and os.fstat(old).st_ino == os.fstat(fd).st_ino:
            # The same pod re-sent (a snapshot after a reconnect): keep the fd
            # the handler already holds a Netns for, so that Netns stays valid.
            os.close(fd)
            await self._handler.add_pod(pod, Netns.validate(f"/proc/self/fd/{old}"))
            return
        try:
            netns = Netns.validate(f"/proc/self/fd/{fd}")
            await self._handler.add_pod(pod, netns)
        except BaseException:
            os.close(fd)
            raise
        # A new netns for a known uid (the sandbox was recreated) replaces the old one.
        self._fds[pod.uid] = fd
        if old is not None:
            os.close(old)

    async def _remove(self, uid: str) -> None:
        await self._handler.remove_pod(uid)
        fd = self._fds.pop(uid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _refuse_stray_fds(kind: str, fds: list[int]) -> None:
    """Only an add carries an fd: any other message's would stay open for good."""
    if kind != "add" and fds:
        for fd in fds:
            os.close(fd)
        raise protocol.ProtocolError(f"{kind} message with {len(fds)} fds")


class _PodRefusedError(Exception):
    """The handler would not take one pod: nack it, keep the session."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _refusable(what: str, step: Awaitable[None]) -> None:
    try:
        await step
    except WeirError as e:
        raise _PodRefusedError(f"{what}: {e.message}") from e
    except Exception as e:
        # An OSError (a port taken in the pod's netns) or a bug in the handler:
        # either way it concerns this pod only.
        if not isinstance(e, OSError):
            log.exception("handoff: %s failed unexpectedly", what)
        raise _PodRefusedError(f"{what}: {type(e).__name__}: {e}") from e


def _successors(message: dict[str, Any]) -> Successors:
    connected, synced = message.get("connected"), message.get("synced")
    if type(connected) is not int or type(synced) is not int or not 0 <= synced <= connected:
        raise protocol.ProtocolError(f"successors message with bad counts: {message}")
    return Successors(connected, synced)
