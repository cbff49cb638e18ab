"""The Linux calls Python's os module lacks, through ctypes: the one place libc is loaded.

Each call raises OSError carrying the errno, like the os module does; callers
that want their own error class translate it. libc is loaded once, with
use_errno, so ctypes.get_errno() reads the errno of the call that just failed
on this thread and not one left behind by another library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Final

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Syscalls glibc 2.36 has no wrapper for. pidfd_getfd came after the
# per-architecture tables were unified, so one number serves every architecture.
_SYS_BPF: Final = {"x86_64": 321, "aarch64": 280}
_SYS_PIDFD_GETFD: Final = 438

_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


class _MallInfo2(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    )  # fmt: skip


# glibc's; absent from other C libraries (and from glibc before 2.33).
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2
_malloc_trim = getattr(_libc, "malloc_trim", None)
_mallopt = getattr(_libc, "mallopt", None)
_M_TRIM_THRESHOLD: Final = -1  # malloc.h
_M_MMAP_THRESHOLD: Final = -3


def heap_free_bytes() -> int | None:
    """Bytes glibc's heap holds free (mallinfo2's fordblks); None without glibc."""
    if _mallinfo2 is None or _malloc_trim is None:
        return None
    return int(_mallinfo2().fordblks)


def release_free_heap() -> bool:
    """Give the heap's free pages back to the kernel (malloc_trim(0)); whether any went."""
    return _malloc_trim is not None and bool(_malloc_trim(0))


def keep_freed_heap(*, trim_above: int, mmap_from: int) -> bool:
    """Let glibc keep what is freed at the heap's top up to `trim_above` bytes, and
    serve allocations under `mmap_from` bytes from the heap; whether it took both.

    By default glibc gives the top back with brk(2) once about 128 KiB of it
    is free, and maps every allocation over 128 KiB (at first) with mmap(2):
    a process that makes and drops buffers of that size on every read pays
    for the syscalls and faults the pages in again each time. Whoever calls
    this gives memory back by other means (`release_free_heap`).
    """
    if _mallopt is None or _malloc_trim is None:  # not glibc
        return False
    return bool(_mallopt(_M_TRIM_THRESHOLD, trim_above)) and bool(
        _mallopt(_M_MMAP_THRESHOLD, mmap_from)
    )


def _checked(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace `fd` refers to (setns(2))."""
    _checked(_libc.setns(fd, nstype), "setns")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _checked(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0), "prctl")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's 64-bit capability sets (capset(2), version 3 layout)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0] = _CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF)
    data[1] = _CapData(effective >> 32, permitted >> 32, inheritable >> 32)
    _checked(_libc.capset(ctypes.byref(header), data), "capset")


def inotify_init1(flags: int) -> int:
    return _checked(_libc.inotify_init1(flags), "inotify_init1")


def inotify_add_watch(fd: int, path: str | os.PathLike[str], mask: int) -> int:
    return _checked(_libc.inotify_add_watch(fd, os.fsencode(path), mask), f"inotify {path}")


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    """bpf(2) with `attr` as the union bpf_attr; `what` names the command in errors."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(0, f"bpf(2) syscall number unknown on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    return _checked(int(ret), what)


def pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of fd `fd` of process `pid` (like ss -p, then a dup)."""
    pidfd = os.pidfd_open(pid)
    try:
        ret = _libc.syscall(ctypes.c_long(_SYS_PIDFD_GETFD), pidfd, fd, 0)
        return _checked(int(ret), f"pidfd_getfd({pid}, {fd})")
    finally:
        os.close(pidfd)
