"""Unix socket helpers for the agent's local servers (CNI events, proxy handoff)."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Final

_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end, as the kernel saw it at connect."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(pid), int(uid), int(gid)


def bind_private(
    sock: socket.socket,
    path: Path,
    mode: int,
    *,
    owner: tuple[int, int] | None = None,
    backlog: int = 128,
) -> None:
    """Bind and listen on `path`, which never exists with a wider mode or not listening.

    Linux creates the socket file with the mode of the unbound socket's inode
    (less the umask), so fchmod before bind leaves no moment where others can
    connect, and the process-wide umask stays untouched for other threads.
    The socket is bound under a temporary name and renamed into place once
    listening, so a client never meets the path refusing connections, and a
    stale file there is replaced in one step.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.fchmod(sock.fileno(), mode)
    try:
        sock.bind(str(tmp))
        if owner is not None:
            os.chown(tmp, *owner)
        sock.listen(backlog)
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
