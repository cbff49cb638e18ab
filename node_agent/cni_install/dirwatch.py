"""Waking up when a directory's entries change: inotify(7).

inotify rather than polling: the primary CNI's rewrite of its config is seen
within milliseconds, and an idle node costs nothing. The installer still
re-reads the directory on a fixed period, so an event inotify drops (queue
overflow, the directory replaced) delays a repair by at most that period.
"""

from __future__ import annotations

import os
import select
import struct
from pathlib import Path
from typing import Final

from node_agent import libc
from weir_common.errors import NodeSetupError

_IN_MODIFY: Final = 0x002
_IN_ATTRIB: Final = 0x004
_IN_CLOSE_WRITE: Final = 0x008
_IN_MOVED_FROM: Final = 0x040
_IN_MOVED_TO: Final = 0x080
_IN_CREATE: Final = 0x100
_IN_DELETE: Final = 0x200
_IN_DELETE_SELF: Final = 0x400
_IN_MOVE_SELF: Final = 0x800
_IN_IGNORED: Final = 0x8000
_IN_ONLYDIR: Final = 0x01000000
_IN_NONBLOCK: Final = 0o4000
_IN_CLOEXEC: Final = 0o2000000
_MASK: Final = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
# The watch is gone once one of these arrives: the directory itself was removed or moved.
_GONE: Final = _IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF
_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of name
_READ_SIZE: Final = 64 * 1024
# Events arrive in bursts (write, close, rename); reading this many buffers drains any burst.
_MAX_READS: Final = 16


class DirWatch:
    """An inotify watch on one directory; `wait()` says whether anything in it changed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.gone = False
        try:
            self._fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except OSError as e:
            raise NodeSetupError(f"inotify_init1: {e.strerror}") from None
        try:
            libc.inotify_add_watch(self._fd, directory, _MASK)
        except OSError as e:
            os.close(self._fd)
            raise FileNotFoundError(e.errno, f"cannot watch {directory}: {e.strerror}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def wait(self, timeout_s: float) -> bool:
        """Block up to `timeout_s`; True if entries changed. Sets `gone` if the dir went away."""
        readable, _, _ = select.select([self._fd], [], [], max(0.0, timeout_s))
        if not readable:
            return False
        for _ in range(_MAX_READS):
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                if mask & _GONE:
                    self.gone = True
                offset += _EVENT.size + length
        return True
