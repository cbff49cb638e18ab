"""The plugin <-> node agent protocol over the agent's Unix socket.

Shared by both sides (weir-cni and node_agent.cni_events); stdlib only, so the
plugin binary stays small.

Exchange
    One request per connection. The plugin connects to the agent's socket
    (DEFAULT_AGENT_SOCKET unless its config says otherwise), sends one request
    frame, reads one reply frame, and closes. The agent answers every request
    it could decode, errors included, so a plugin never has to guess.

Framing
    A frame is a 4-byte unsigned big-endian length N (1 <= N <= MAX_FRAME)
    followed by N bytes of a UTF-8 JSON object.

Messages (version 1)
    request:  {"v": 1, "op": OP, "pod": POD, "attachments": [[ID, IFNAME], ...],
               "plugin_log": [LINE, ...]}
        OP is "add", "del" or "check" (with "pod"), "gc" (with "attachments":
        the attachments the runtime still has, everything else is stale), or
        "status" (is the agent ready to take ADDs?). "plugin_log" carries the
        lines the plugin also wrote to its stderr, so they reach the agent's log.
    POD:      {"container_id", "netns", "ifname", "namespace", "name", "uid": str,
               "ips": [CIDR, ...]}
        namespace, name and uid are "" when the runtime gave no K8S_POD_* args.
    reply:    {"v": 1, "ok": true, "captured": BOOL, "reason": STR}
              {"v": 1, "ok": false, "error": STR, "retryable": BOOL}
        `captured` is meaningful for "add" only: false means the agent decided
        the pod stays out of the mesh (an opt-out annotation, say) and `reason`
        says why. A failure's `error` is one line fit for `kubectl describe`;
        `retryable` says whether the same request may succeed later.

Versioning
    "v" is the protocol version. Adding an optional field keeps it (both sides
    ignore fields they do not know); any other change bumps it. The agent
    refuses a version it does not speak with a non-retryable error naming the
    versions it does, and the plugin treats a reply of another version as a
    protocol error. The agent installs the plugin binary that matches it at
    start, so a mismatch lives at most as long as one upgrade.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any, Final, Literal, NamedTuple, TypeGuard

PROTOCOL_VERSION: Final = 1
# The node agent listens here (root only, mode 0600); the installer writes the
# path into the plugin's config, so both ends agree even when it is changed.
DEFAULT_AGENT_SOCKET: Final = "/var/run/weir/cni.sock"
# A request is a pod and a few log lines; a GC list of thousands of
# attachments is the largest thing that legitimately goes over the wire.
MAX_FRAME: Final = 1 << 20
_HEADER: Final = struct.Struct(">I")

Op = Literal["add", "del", "check", "gc", "status"]
OPS: Final[tuple[Op, ...]] = ("add", "del", "check", "gc", "status")


class ProtocolError(Exception):
    """The peer sent something that is not a valid message of this protocol."""


class ConnectionClosedError(ConnectionError):
    """The peer hung up before a whole frame arrived.

    A transport failure, not nonsense: an agent that dies or restarts in the
    middle of a request looks exactly like this, and the plugin must then
    report a retryable error, whichever byte the connection ended at.
    """


class PodInfo(NamedTuple):
    """What the runtime told the plugin about one pod sandbox."""

    container_id: str
    netns: str
    ifname: str
    ips: tuple[str, ...]
    namespace: str = ""
    name: str = ""
    uid: str = ""

    def describe(self) -> str:
        """`namespace/name` when known, else the container id (for messages)."""
        if self.namespace and self.name:
            return f"{self.namespace}/{self.name}"
        return f"container {self.container_id}"


class Request(NamedTuple):
    op: Op
    pod: PodInfo | None = None
    attachments: tuple[tuple[str, str], ...] = ()
    plugin_log: tuple[str, ...] = ()


class Reply(NamedTuple):
    ok: bool
    captured: bool = False
    reason: str = ""
    error: str = ""
    retryable: bool = False

    @classmethod
    def success(cls, *, captured: bool = False, reason: str = "") -> Reply:
        return cls(ok=True, captured=captured, reason=reason)

    @classmethod
    def failure(cls, error: str, *, retryable: bool) -> Reply:
        return cls(ok=False, error=error, retryable=retryable)


# -- encoding ---------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": request.op}
    if request.pod is not None:
        pod = request.pod._asdict()
        pod["ips"] = list(request.pod.ips)
        body["pod"] = pod
    if request.op == "gc":
        # Always present, even empty: "no attachments left" and "field missing"
        # must never look alike, since the first unenrolls every pod.
        body["attachments"] = [list(a) for a in request.attachments]
    if request.plugin_log:
        body["plugin_log"] = list(request.plugin_log)
    return _frame(body)


def encode_reply(reply: Reply) -> bytes:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": reply.ok}
    if reply.ok:
        body.update(captured=reply.captured, reason=reply.reason)
    else:
        body.update(error=reply.error, retryable=reply.retryable)
    return _frame(body)


def _frame(body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {MAX_FRAME} byte limit")
    return _HEADER.pack(len(payload)) + payload


def decode_request(payload: bytes) -> Request:
    """Parse a request; a version other than ours raises ProtocolError saying so."""
    body = _body(payload)
    op = body.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    pod = None
    if op in ("add", "del", "check"):
        pod = _pod(body.get("pod"))
        if op != "del" and not pod.netns:
            raise ProtocolError(f"a {op} request needs the pod's netns")
    elif "pod" in body:
        raise ProtocolError(f"op {op!r} takes no 'pod'")
    attachments: list[tuple[str, str]] = []
    if op == "gc":
        if "attachments" not in body:
            raise ProtocolError("a gc request needs 'attachments' (the attachments still valid)")
        for entry in _list(body, "attachments"):
            if not (
                isinstance(entry, list) and len(entry) == 2 and all(_is_str(x) and x for x in entry)
            ):
                raise ProtocolError(f"attachment {_excerpt(entry)} is not [container_id, ifname]")
            attachments.append((entry[0], entry[1]))
    elif "attachments" in body:
        raise ProtocolError(f"op {op!r} takes no 'attachments'")
    log = _list(body, "plugin_log")
    if not all(_is_str(line) for line in log):
        raise ProtocolError("plugin_log must be a list of strings")
    return Request(op=op, pod=pod, attachments=tuple(attachments), plugin_log=tuple(log))


def decode_reply(payload: bytes) -> Reply:
    body = _body(payload)
    ok = body.get("ok")
    if ok is True:
        captured, reason = body.get("captured", False), body.get("reason", "")
        if not isinstance(captured, bool) or not _is_str(reason):
            raise ProtocolError("a success reply needs a boolean captured and a string reason")
        return Reply.success(captured=captured, reason=reason)
    if ok is False:
        error, retryable = body.get("error"), body.get("retryable")
        if not _is_str(error) or not isinstance(retryable, bool):
            raise ProtocolError("a failure reply needs a string error and a boolean retryable")
        return Reply.failure(error, retryable=retryable)
    raise ProtocolError("reply has no boolean 'ok'")


def _body(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # RecursionError: nesting deep enough to exhaust the decoder's stack.
        raise ProtocolError(f"message is not UTF-8 JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a JSON object")
    version = body.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    return body


def _pod(value: object) -> PodInfo:
    """Every field must be present: both plugins always send all of them, so a
    missing one means a sender that is not ours, and guessing a default could
    act on the wrong pod."""
    if not isinstance(value, dict):
        raise ProtocolError("request needs a 'pod' object")
    fields: dict[str, str] = {}
    for key in ("container_id", "netns", "ifname", "namespace", "name", "uid"):
        if key not in value:
            raise ProtocolError(f"pod field {key!r} is missing")
        field = value[key]
        if not _is_str(field):
            raise ProtocolError(f"pod field {key!r} must be a string")
        fields[key] = field
    if not fields["container_id"]:
        raise ProtocolError("pod has no container_id")
    if "ips" not in value:
        raise ProtocolError("pod field 'ips' is missing")
    ips = value["ips"]
    if not isinstance(ips, list) or not all(_is_str(ip) for ip in ips):
        raise ProtocolError("pod field 'ips' must be a list of strings")
    return PodInfo(ips=tuple(ips), **fields)


def _excerpt(value: object) -> str:
    """A bounded rendering of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key, [])
    if not isinstance(value, list):
        raise ProtocolError(f"{key!r} must be a list")
    return value


def _is_str(value: object) -> TypeGuard[str]:
    return isinstance(value, str)


# -- transport --------------------------------------------------------------


def send_message(sock: socket.socket, frame: bytes, deadline: float) -> None:
    """Send one encoded frame, giving up (TimeoutError) at `deadline` (time.monotonic)."""
    sock.settimeout(_remaining(deadline))
    sock.sendall(frame)


def recv_message(sock: socket.socket, deadline: float) -> bytes:
    """Read one frame's payload.

    ConnectionClosedError if the peer hangs up first, ProtocolError if it lies about the size.
    """
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size, deadline))
    if not 0 < size <= MAX_FRAME:
        raise ProtocolError(f"frame length {size} is outside 1..{MAX_FRAME}")
    return _recv_exactly(sock, size, deadline)


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    got = 0
    # Each recv returns at least one byte or ends the loop, so `size` bounds it.
    while got < size:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionClosedError(f"connection closed after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left
