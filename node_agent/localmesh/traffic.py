"""Observable TCP traffic in namespaces: who sent what, and where it landed.

Used by the capture tests and by `weir demo` to show capture at work. Each
connection carries a unique token; listeners record which token arrived on
which listener, from which peer, and (for captured connections) the original
destination. A connection that escaped capture therefore shows up on the
real server instead of the proxy port, or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from typing import Literal

from node_agent import netns as netns_mod
from node_agent.netns import Netns
from node_agent.proxy.original_dst import original_destination

Outcome = Literal["ok", "refused", "unreachable", "timeout", "error"]

# Runs as the client, possibly as another UID/GID, so it depends on nothing but
# the standard library (the checkout may not be readable by that user).
_CLIENT = r"""
import errno, json, socket, sys
host, port, token, mark, timeout = sys.argv[1:6]
port, mark, timeout = int(port), int(mark), float(timeout)
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(timeout)
if mark:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
try:
    s.connect((host, port))
    s.sendall(token.encode() + b"\n")
    reply = s.recv(64)
    outcome = "ok" if reply.startswith(b"ok") else "error"
except ConnectionRefusedError:
    outcome = "refused"
except (socket.timeout, TimeoutError):
    outcome = "timeout"
except OSError as e:
    outcome = "unreachable" if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH) else "error"
print(json.dumps({"outcome": outcome}))
"""


@dataclass(frozen=True)
class Arrival:
    listener: str
    token: str
    peer: str
    original_dst: tuple[str, int] | None


@dataclass(frozen=True)
class Attempt:
    token: str
    outcome: Outcome


@dataclass
class TrafficObserver:
    """Listeners in namespaces that record every token they receive."""

    arrivals: dict[str, Arrival] = field(default_factory=dict)
    _sockets: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def listen(self, netns: Netns, name: str, port: int, ipv6: bool = True) -> None:
        """Accept on 0.0.0.0:port (and [::]:port) inside `netns`, recording as `name`."""
        families = [socket.AF_INET, socket.AF_INET6] if ipv6 else [socket.AF_INET]
        threads: list[threading.Thread] = []
        with netns_mod.entered(netns):
            for family in families:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))  # noqa: S104
                sock.listen(64)
                sock.settimeout(0.2)
                self._sockets.append(sock)
                threads.append(threading.Thread(target=self._serve, args=(sock, name), daemon=True))
        for thread in threads:
            thread.start()
            # Tracked only once started: an interrupt (Ctrl-C, SIGTERM) can run
            # close() in between, and a thread never started cannot be joined.
            self._threads.append(thread)

    def _serve(self, listener: socket.socket, name: str) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    token = conn.recv(128).split(b"\n", 1)[0].decode()
                    try:
                        dst: tuple[str, int] | None = original_destination(conn)
                    except OSError:
                        dst = None
                    # Without capture the "original" is just the local address.
                    if dst == conn.getsockname()[:2]:
                        dst = None
                    conn.sendall(b"ok\n")
                except OSError:
                    continue
            with self._changed:
                self.arrivals[token] = Arrival(name, token, peer[0], dst)
                self._changed.notify_all()

    def wait_for(self, token: str, timeout: float = 3.0) -> Arrival | None:
        with self._changed:
            self._changed.wait_for(lambda: token in self.arrivals, timeout=timeout)
            return self.arrivals.get(token)

    def close(self) -> None:
        self._stopping.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> TrafficObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    netns: Netns,
    address: str,
    port: int,
    *,
    uid: int | None = None,
    gid: int | None = None,
    mark: int = 0,
    timeout: float = 3.0,
) -> Attempt:
    """Open one TCP connection from inside `netns` as the given user/group/mark."""
    token = uuid.uuid4().hex
    # The venv's python is a symlink into the system; the real binary is what
    # another UID can always execute.
    python = os.path.realpath(sys.executable)
    argv = [python, "-I", "-S", "-c", _CLIENT, address, str(port), token, str(mark), str(timeout)]
    with netns_mod.entered(netns):
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None or gid is not None else None,
            check=False,
        )
    if proc.returncode != 0:
        return Attempt(token, "error")
    outcome: Outcome = json.loads(proc.stdout)["outcome"]
    return Attempt(token, outcome)
