"""The bpf(2) calls Weir needs beyond what bcc offers, through node_agent.libc.

bcc compiles and loads; pinning, opening pins, BPF links and map access by
pinned fd (a restarted agent has no bcc object) are plain bpf(2) commands,
so this wrapper needs no library beyond libc. Attribute layouts follow
include/uapi/linux/bpf.h (`union bpf_attr`).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from node_agent import libc


class Cmd(IntEnum):
    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    OBJ_PIN = 6
    OBJ_GET = 7
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    LINK_CREATE = 28


class MapType(IntEnum):
    HASH = 1
    ARRAY = 2
    LRU_HASH = 9
    LPM_TRIE = 11
    SOCKHASH = 18


class AttachType(IntEnum):
    CGROUP_SOCK_OPS = 3
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_GETSOCKOPT = 21
    SK_LOOKUP = 36


class ProgType(IntEnum):
    SOCK_OPS = 13
    CGROUP_SOCK_ADDR = 18
    CGROUP_SOCKOPT = 25
    SK_LOOKUP = 30


BPF_ANY: Final = 0
_QUERY_EFFECTIVE: Final = 1


def _bpf(cmd: Cmd, attr: ctypes.Array[ctypes.c_char]) -> int:
    return libc.bpf(cmd, attr, f"bpf({cmd.name})")


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(Cmd.OBJ_PIN, ctypes.create_string_buffer(struct.pack("<QII", _addr(name), fd, 0), 16))


def obj_get(path: str) -> int:
    """A new fd for the object pinned at `path` (FileNotFoundError if nothing is)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(
        Cmd.OBJ_GET, ctypes.create_string_buffer(struct.pack("<QII", _addr(name), 0, 0), 16)
    )


def map_create(
    map_type: MapType, key_size: int, value_size: int, max_entries: int, name: str
) -> int:
    """A new map's fd; it lives while an fd or a pin refers to it."""
    attr = struct.pack(
        "<IIIIIII16s", map_type, key_size, value_size, max_entries, 0, 0, 0, name.encode()
    )
    return _bpf(Cmd.MAP_CREATE, ctypes.create_string_buffer(attr, 72))


def link_create(prog_fd: int, target_fd: int, attach_type: AttachType) -> int:
    """A BPF link: the attachment lives as long as the link (or its pin) does.

    Links on a cgroup are always multi-attach: programs others attached
    with BPF_F_ALLOW_MULTI keep running beside ours.
    """
    attr = struct.pack("<IIII", prog_fd, target_fd, attach_type, 0)
    return _bpf(Cmd.LINK_CREATE, ctypes.create_string_buffer(attr, 64))


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k, v = (
        ctypes.create_string_buffer(key, len(key)),
        ctypes.create_string_buffer(value, len(value)),
    )
    _bpf(
        Cmd.MAP_UPDATE_ELEM,
        ctypes.create_string_buffer(struct.pack("<I4xQQQ", fd, _addr(k), _addr(v), flags), 32),
    )


def map_delete(fd: int, key: bytes) -> bool:
    """Whether the key was there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(
            Cmd.MAP_DELETE_ELEM,
            ctypes.create_string_buffer(struct.pack("<I4xQQQ", fd, _addr(k), 0, 0), 32),
        )
    except FileNotFoundError:
        return False
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(
            Cmd.MAP_LOOKUP_ELEM,
            ctypes.create_string_buffer(struct.pack("<I4xQQQ", fd, _addr(k), _addr(v), 0), 32),
        )
    except FileNotFoundError:
        return None
    return v.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, walked with GET_NEXT_KEY (entries deleted meanwhile may be skipped)."""
    cur: ctypes.Array[ctypes.c_char] | None = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        attr = struct.pack("<I4xQQQ", fd, _addr(cur) if cur is not None else 0, _addr(nxt), 0)
        try:
            _bpf(Cmd.MAP_GET_NEXT_KEY, ctypes.create_string_buffer(attr, 32))
        except FileNotFoundError:
            return
        yield nxt.raw
        cur = nxt


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    _bpf(
        Cmd.OBJ_GET_INFO_BY_FD,
        ctypes.create_string_buffer(struct.pack("<IIQ", fd, size, _addr(buf)), 16),
    )
    return buf.raw


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 80)
    mtype, mid, key_size, value_size, max_entries, flags = struct.unpack_from("<IIIIII", raw)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(mid, mtype, key_size, value_size, max_entries, flags, name)


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 96)
    ptype, pid = struct.unpack_from("<II", raw)
    return ProgInfo(pid, ptype, raw[64:80].split(b"\0", 1)[0].decode())


@dataclass(frozen=True)
class LinkInfo:
    id: int
    prog_id: int
    attach_type: int
    # For a cgroup link the cgroup id, for a netns link the netns inode;
    # 0 once the target is gone (a netns that was deleted).
    target: int


_LINK_TYPE_CGROUP: Final = 3
_LINK_TYPE_NETNS: Final = 5


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 64)
    ltype, lid, prog_id = struct.unpack_from("<III", raw)
    if ltype == _LINK_TYPE_CGROUP:
        target, attach = struct.unpack_from("<QI", raw, 16)
    elif ltype == _LINK_TYPE_NETNS:
        target, attach = struct.unpack_from("<II", raw, 16)
    else:
        target, attach = 0, 0
    return LinkInfo(lid, prog_id, attach, target)


def effective_prog_ids(cgroup_fd: int, attach_type: AttachType) -> list[int]:
    """Ids of the programs that run for `attach_type` in that cgroup, inherited ones included."""
    ids = (ctypes.c_uint32 * 64)()
    attr = bytearray(
        struct.pack(
            "<IIIIQI4x", cgroup_fd, attach_type, _QUERY_EFFECTIVE, 0, ctypes.addressof(ids), 64
        )
    )
    buf = ctypes.create_string_buffer(bytes(attr), 40)
    _bpf(Cmd.PROG_QUERY, buf)
    (count,) = struct.unpack_from("<I", buf.raw, 24)
    return list(ids[:count])
