"""Agent -> proxy handoff: one Unix SOCK_SEQPACKET connection per proxy process.

The node agent owns the socket and the truth about which pods are enrolled;
the proxy connects to it. Every datagram is one UTF-8 JSON object; a pod's
network namespace travels as a file descriptor (SCM_RIGHTS), so the proxy
never needs the host's /var/run/netns mounted and cannot be fooled by a path
that was reused for another namespace.

    proxy -> agent   {"type": "hello", "version": 2}
                     {"type": "hello", "version": 3, "group": "...", "workers": N}
    agent -> proxy   {"seq": N, "type": "add", "pod": {...}}      + 1 fd (the pod netns)
                     {"seq": N, "type": "remove", "uid": "..."}
                     {"seq": N, "type": "snapshot_done"}
                     {"seq": N, "type": "successors", "connected": C, "synced": S}
    proxy -> agent   {"seq": N, "type": "ack"}
                     {"seq": N, "type": "nack", "error": "..."}

On connect the agent sends every enrolled pod (`add`), then `snapshot_done`,
then changes as they happen. Exactly one message is in flight per
connection: the agent waits for its ack before sending the next, so the
proxy's listeners exist before the agent reports a pod enrolled. Several
proxies may be connected at once (a new one taking over from an old one
during a rollout); each gets the full snapshot and every change.

`successors` (version 2) tells a proxy how many proxies connected after it
and how many of those hold the full snapshot. It is how an old proxy knows,
when told to stop, whether someone else already listens in every pod: it
closes its listeners only then (or when its handover time is up), so the
kernel moves its queued connections to the successor instead of resetting
them. A version 1 proxy never gets it.

Version 3 is a proxy of several worker processes (`weir proxy run
--workers`): each worker is a connection of its own, and all of a proxy's
workers say the same `group` and how many workers it has. Workers of one
group are not each other's successors; a group counts as one successor,
connected with its first worker and holding every pod once all its workers
do. A proxy of one worker still says version 2, which every agent speaks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from dataclasses import asdict, dataclass
from typing import Any, Final, TypeGuard

from weir_common.errors import InvalidInputError

VERSION = 2
GROUP_VERSION = 3
# Version 1 proxies (before successors existed) are still served.
SUPPORTED_VERSIONS = frozenset({1, 2, 3})
MAX_DATAGRAM = 64 * 1024
MAX_GROUP_LENGTH = 64
MAX_WORKERS = 64


class ProtocolError(InvalidInputError):
    """The peer sent something that is not this protocol; the connection is dropped."""


@dataclass(frozen=True)
class EnrolledPod:
    """What the proxy needs to know about a pod besides its netns."""

    uid: str
    name: str
    namespace: str
    service_account: str
    ips: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> EnrolledPod:
        if not isinstance(data, dict):
            raise ProtocolError("handoff message without a pod object")
        uid, name, namespace, account, ips = (
            data.get(key) for key in ("uid", "name", "namespace", "service_account", "ips")
        )
        # Strictly as sent: str() would turn null into "None" and a string into its letters.
        if not (
            isinstance(uid, str)
            and isinstance(name, str)
            and isinstance(namespace, str)
            and isinstance(account, str)
            and _ip_list(ips)
        ):
            raise ProtocolError(f"malformed pod in handoff message: {_excerpt(data)}")
        pod = cls(uid, name, namespace, account, tuple(ips))
        if not pod.uid:
            raise ProtocolError("pod without uid in handoff message")
        return pod


def _ip_list(value: object) -> TypeGuard[list[str]]:
    if not isinstance(value, list) or not all(isinstance(ip, str) for ip in value):
        return False
    try:
        for ip in value:
            ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def _excerpt(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_DATAGRAM:
        raise ProtocolError(f"handoff message of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: also an integer too long to convert; RecursionError: deep nesting.
        raise ProtocolError(f"handoff message is not JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("handoff message without a type")
    return message


@dataclass(frozen=True)
class Hello:
    """What a proxy says first: its version and, from version 3, its worker group."""

    version: int
    group: str | None = None  # None: a proxy of one process, a group of its own
    workers: int = 1

    def to_json(self) -> dict[str, Any]:
        if self.group is None:
            return {"type": "hello", "version": self.version}
        return {
            "type": "hello",
            "version": self.version,
            "group": self.group,
            "workers": self.workers,
        }


# What a proxy of one process says.
SINGLE_PROCESS_HELLO: Final = Hello(VERSION)


def expect_hello(message: dict[str, Any]) -> Hello:
    """What the proxy said in its hello; ProtocolError if it is not one."""
    version = message.get("version")
    # type(), not isinstance: JSON true is a bool, and True == 1.
    if (
        message.get("type") != "hello"
        or type(version) is not int
        or version not in SUPPORTED_VERSIONS
    ):
        raise ProtocolError(
            f"expected hello with a version in {sorted(SUPPORTED_VERSIONS)}, "
            f"got {_excerpt(message)}"
        )
    if version < GROUP_VERSION:
        return Hello(version)
    group, workers = message.get("group"), message.get("workers")
    if not isinstance(group, str) or not 0 < len(group) <= MAX_GROUP_LENGTH:
        raise ProtocolError(
            f"version {version} hello without a group of 1 to {MAX_GROUP_LENGTH} characters: "
            f"{_excerpt(message)}"
        )
    if type(workers) is not int or not 1 <= workers <= MAX_WORKERS:
        raise ProtocolError(
            f"version {version} hello without a worker count of 1 to {MAX_WORKERS}: "
            f"{_excerpt(message)}"
        )
    return Hello(version, group, workers)


async def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode(message)
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(sock, [data], fds or [])
        except BlockingIOError:
            await _ready(loop, sock, writable=True)
        else:
            return


async def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the fds that came with it; raises ConnectionError at EOF."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, MAX_DATAGRAM, 4)
            break
        except BlockingIOError:
            await _ready(loop, sock, writable=False)
    if not data and not fds:
        raise ConnectionError("handoff peer closed the connection")
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            socket.close(fd)
        raise ProtocolError("handoff message carried more file descriptors than allowed")
    try:
        return decode(data), fds
    except ProtocolError:
        for fd in fds:
            socket.close(fd)
        raise


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, writable: bool) -> None:
    # asyncio has no recvmsg/sendmsg-with-fds coroutine; wait for readiness and retry.
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    fd = sock.fileno()
    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await done
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
