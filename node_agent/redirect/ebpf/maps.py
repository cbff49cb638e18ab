"""The eBPF mode's maps as plain values: layouts, a pod's entries, the C config header.

Everything here is pure. The byte layouts mirror bpf/lib/weir_maps.h (change
both together; the unit tests pin them with golden files), and the C
constants the programs need are rendered from this module and
node_agent.constants, so each number is declared once.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

from node_agent.constants import (
    INBOUND_TUNNEL_PORT,
    OUTBOUND_CAPTURE_PORT,
    PROBE_SNAT_IPV4,
    PROBE_SNAT_IPV6,
    PROXY_GID,
    PROXY_MARK,
    PROXY_MARK_MASK,
    PROXY_UID,
)
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.ebpf.sys_bpf import MapType

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Entries = dict[bytes, bytes]


class MapName(StrEnum):
    """Map names as the kernel and the pin directory show them (at most 15 characters)."""

    PODS = "weir_pods"
    PORTS = "weir_ports"
    CIDRS = "weir_cidrs"
    POD_ADDRS = "weir_pod_addrs"
    LISTENERS = "weir_listeners"
    SOCK_DST = "weir_sock_dst"
    ORIG_DST = "weir_orig_dst"


# The maps the agent fills per pod, in the order apply writes them: the pod
# entry comes last, so capture starts only once its exclusions are in place.
POD_CONFIG_MAPS: Final = (MapName.PORTS, MapName.CIDRS, MapName.POD_ADDRS, MapName.PODS)


class Direction(IntEnum):
    OUTBOUND = 1
    INBOUND = 2


class PortVerdict(IntEnum):
    EXCLUDE = 1
    INCLUDE = 2


class CidrReason(IntEnum):
    EXCLUDED = 1  # the operator's --exclude-outbound-cidrs
    POD_ADDRESS = 2  # the pod's own address: iptables' `-o lo` keeps it in the pod


POD_INBOUND_INCLUDED_ONLY: Final = 1 << 0

# Cookie (64 bits) and family (32 bits) precede the address in weir_cidrs keys.
CIDR_KEY_FIXED_BITS: Final = 96

MAX_PODS: Final = 4096
MAX_PORT_RULES: Final = 65536
MAX_CIDR_RULES: Final = 65536
MAX_POD_ADDRS: Final = 16384
MAX_LISTENERS: Final = 8192
MAX_CONNECTIONS: Final = 262144
BPF_F_NO_PREALLOC: Final = 1

# Bumped whenever bpf/ changes what the pinned maps or programs mean in a way
# map shapes alone do not show (a field reinterpreted, a flag added): pins
# made under another version are refused rather than reused.
# 2: sk_lookup lets the kubelet probe source through; a version-1 sk_lookup,
#    reused, would send probes to the proxy and fail them under STRICT.
LAYOUT_VERSION: Final = 2
# One-entry array, pinned beside the maps, holding the LAYOUT_VERSION of the
# install. bpffs holds only BPF objects, so a map is the one thing that can
# sit next to the pins and vanish with them (reboot, uninstall).
META_MAP: Final = "weir_meta"


@dataclass(frozen=True)
class MapSpec:
    """A map's shape as the kernel reports it: what makes pinned maps reusable."""

    type: int  # MapType, or whatever the kernel reports
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


# Mirrors the declarations in bpf/lib/weir_maps.h; install checks what bcc
# created against this, so the two cannot drift apart unnoticed.
MAP_SPECS: Final = {
    MapName.PODS: MapSpec(MapType.HASH, 8, 8, MAX_PODS),
    MapName.PORTS: MapSpec(MapType.HASH, 16, 1, MAX_PORT_RULES),
    MapName.CIDRS: MapSpec(MapType.LPM_TRIE, 32, 1, MAX_CIDR_RULES, BPF_F_NO_PREALLOC),
    MapName.POD_ADDRS: MapSpec(MapType.HASH, 20, 8, MAX_POD_ADDRS),
    MapName.LISTENERS: MapSpec(MapType.SOCKHASH, 16, 8, MAX_LISTENERS),
    MapName.SOCK_DST: MapSpec(MapType.LRU_HASH, 8, 20, MAX_CONNECTIONS),
    MapName.ORIG_DST: MapSpec(MapType.LRU_HASH, 48, 20, MAX_CONNECTIONS),
}
META_SPEC: Final = MapSpec(MapType.ARRAY, 4, 4, 1)


def spec_differences(name: str, actual: MapSpec, expected: MapSpec) -> list[str]:
    """Each way map `name` is not shaped as expected, in words."""
    out = []
    if actual.type != expected.type:
        out.append(
            f"{name}: map type {_type_name(actual.type)}, expected {_type_name(expected.type)}"
        )
    for what, have, want in (
        ("key size", actual.key_size, expected.key_size),
        ("value size", actual.value_size, expected.value_size),
        ("max_entries", actual.max_entries, expected.max_entries),
        ("flags", actual.flags, expected.flags),
    ):
        if have != want:
            out.append(f"{name}: {what} {have}, expected {want}")
    return out


def _type_name(t: int) -> str:
    try:
        return MapType(t).name.lower()
    except ValueError:
        return str(t)


def encode_layout_version(version: int) -> bytes:
    return struct.pack("<I", version)


def decode_layout_version(raw: bytes) -> int:
    return int(struct.unpack("<I", raw)[0])


@dataclass(frozen=True)
class CConstant:
    name: str
    value: int
    why: str
    hex: bool = False


# The probe source, in host byte order: the programs compare after bpf_ntohl.
_PROBE_V4: Final = int(ipaddress.IPv4Address(PROBE_SNAT_IPV4))
_PROBE_V6_WORDS: Final = struct.unpack(">4I", ipaddress.IPv6Address(PROBE_SNAT_IPV6).packed)

# Every load-time constant of bpf/, declared once. Map sizes bound kernel
# memory; a full map makes updates fail loudly in apply, never silently.
C_CONSTANTS: Final = (
    CConstant("WEIR_OUTBOUND_CAPTURE_PORT", OUTBOUND_CAPTURE_PORT, "proxy outbound listener"),
    CConstant("WEIR_INBOUND_TUNNEL_PORT", INBOUND_TUNNEL_PORT, "HBONE: never captured inbound"),
    CConstant("WEIR_PROXY_UID", PROXY_UID, "the proxy's connects are never captured"),
    CConstant("WEIR_PROXY_GID", PROXY_GID, "the proxy's connects are never captured"),
    CConstant("WEIR_PROXY_MARK", PROXY_MARK, "mark the proxy sets on its sockets", hex=True),
    CConstant("WEIR_PROXY_MARK_MASK", PROXY_MARK_MASK, "the bits of the mark Weir owns", hex=True),
    CConstant("WEIR_LOOPBACK_V4", 0x7F000001, "127.0.0.1, where captured connects go", hex=True),
    CConstant("WEIR_LOOPBACK_IFINDEX", 1, "lo is ifindex 1 in every netns"),
    CConstant("WEIR_PROBE_SOURCE_V4", _PROBE_V4, "kubelet probes, SNATed by the node", hex=True),
    *(
        CConstant(f"WEIR_PROBE_SOURCE_V6_{i}", word, f"kubelet probes (IPv6), word {i}", hex=True)
        for i, word in enumerate(_PROBE_V6_WORDS)
    ),
    CConstant("WEIR_POD_INBOUND_INCLUDED_ONLY", POD_INBOUND_INCLUDED_ONLY, "weir_pod.flags"),
    CConstant("WEIR_DIR_OUTBOUND", Direction.OUTBOUND, "weir_port_key.direction"),
    CConstant("WEIR_DIR_INBOUND", Direction.INBOUND, "weir_port_key.direction"),
    CConstant("WEIR_PORT_EXCLUDE", PortVerdict.EXCLUDE, "weir_ports value"),
    CConstant("WEIR_PORT_INCLUDE", PortVerdict.INCLUDE, "weir_ports value"),
    CConstant("WEIR_CIDR_KEY_FIXED_BITS", CIDR_KEY_FIXED_BITS, "weir_cidr_key bits before addr"),
    CConstant("WEIR_CONNECT_CONTINUE", 1, "cgroup/connect*: let the connect proceed"),
    CConstant("WEIR_SOCKOPS_OK", 1, "sockops: no opinion"),
    CConstant("WEIR_SOCKOPT_CONTINUE", 1, "cgroup/getsockopt: return to the caller"),
    CConstant("WEIR_PAGE_SIZE", 4096, "the most of optval a getsockopt program sees"),
    CConstant("WEIR_SOL_IP", 0, "linux/in.h"),
    CConstant("WEIR_SOL_IPV6", 41, "linux/in6.h"),
    CConstant("WEIR_SOL_TCP", 6, "linux/in.h IPPROTO_TCP"),
    CConstant("WEIR_TCP_ZEROCOPY_RECEIVE", 35, "linux/tcp.h"),
    CConstant("WEIR_SO_ORIGINAL_DST", 80, "SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST"),
    CConstant("WEIR_MAX_PODS", MAX_PODS, "captured pods per node"),
    CConstant("WEIR_MAX_PORT_RULES", MAX_PORT_RULES, "port exclusions/inclusions, all pods"),
    CConstant("WEIR_MAX_CIDR_RULES", MAX_CIDR_RULES, "CIDR exclusions and pod addresses, all pods"),
    CConstant("WEIR_MAX_POD_ADDRS", MAX_POD_ADDRS, "addresses of captured pods"),
    CConstant("WEIR_MAX_LISTENERS", MAX_LISTENERS, "proxy inbound listeners (two per pod)"),
    CConstant(
        "WEIR_MAX_CONNECTIONS", MAX_CONNECTIONS, "connections whose original destination is kept"
    ),
)


def config_header() -> str:
    """bpf/'s weir_config.h, prepended to the sources at compile time."""
    lines = [
        "/* Generated by node_agent/redirect/ebpf/maps.py; do not edit. */",
        "#ifndef WEIR_CONFIG_H",
        "#define WEIR_CONFIG_H",
    ]
    for c in C_CONSTANTS:
        value = f"{c.value:#x}" if c.hex else str(int(c.value))
        lines.append(f"#define {c.name} {value} /* {c.why} */")
    lines.append("#endif")
    return "\n".join(lines) + "\n"


# -- encodings (little-endian host fields, network-order addresses) ---------


def _addr_words(ip: IPAddress) -> bytes:
    """16 bytes: IPv4 in the first four (network order), IPv6 as is."""
    return ip.packed.ljust(16, b"\0")


def encode_cookie(cookie: int) -> bytes:
    return struct.pack("<Q", cookie)


def encode_pod(flags: int) -> bytes:
    return struct.pack("<II", flags, 0)


def encode_port_key(cookie: int, port: int, direction: Direction) -> bytes:
    return struct.pack("<QHB5x", cookie, port, direction)


def encode_cidr_key(cookie: int, network: IPNetwork) -> bytes:
    prefixlen = CIDR_KEY_FIXED_BITS + network.prefixlen
    return struct.pack("<IQI", prefixlen, cookie, network.version) + _addr_words(
        network.network_address
    )


def encode_addr(ip: IPAddress) -> bytes:
    return struct.pack("<I", ip.version) + _addr_words(ip)


def encode_listener_key(cookie: int, family: int) -> bytes:
    return struct.pack("<QII", cookie, family, 0)


def key_cookie(name: MapName, key: bytes, value: bytes) -> int:
    """The netns cookie an entry of a per-pod map belongs to."""
    if name in (MapName.PODS, MapName.PORTS, MapName.LISTENERS):
        return int(struct.unpack_from("<Q", key)[0])
    if name == MapName.CIDRS:
        return int(struct.unpack_from("<Q", key, 4)[0])
    if name == MapName.POD_ADDRS:
        return int(struct.unpack_from("<Q", value)[0])
    raise ValueError(f"{name} is not a per-pod map")


def pod_entries(
    cookie: int, config: CaptureConfig, addresses: Iterable[IPAddress]
) -> dict[MapName, Entries]:
    """Every map entry one pod's capture consists of, per map (POD_CONFIG_MAPS)."""
    ports: Entries = {}
    for port in config.exclude_outbound_ports:
        ports[encode_port_key(cookie, port, Direction.OUTBOUND)] = bytes([PortVerdict.EXCLUDE])
    for port in config.exclude_inbound_ports:
        ports[encode_port_key(cookie, port, Direction.INBOUND)] = bytes([PortVerdict.EXCLUDE])
    for port in config.include_inbound_ports:
        key = encode_port_key(cookie, port, Direction.INBOUND)
        # Excluding wins over including, as in the iptables rules (exclusions come first).
        ports.setdefault(key, bytes([PortVerdict.INCLUDE]))
    cidrs: Entries = {}
    addrs: Entries = {}
    for ip in sorted(set(addresses), key=lambda a: (a.version, a)):
        cidrs[encode_cidr_key(cookie, ipaddress.ip_network(ip))] = bytes([CidrReason.POD_ADDRESS])
        addrs[encode_addr(ip)] = encode_cookie(cookie)
    for net in config.exclude_outbound_cidrs:
        cidrs[encode_cidr_key(cookie, net)] = bytes([CidrReason.EXCLUDED])
    flags = POD_INBOUND_INCLUDED_ONLY if config.include_inbound_ports else 0
    return {
        MapName.PORTS: ports,
        MapName.CIDRS: cidrs,
        MapName.POD_ADDRS: addrs,
        MapName.PODS: {encode_cookie(cookie): encode_pod(flags)},
    }


@dataclass(frozen=True)
class MapPlan:
    """What turns one map's current entries for a pod into the desired ones."""

    update: Entries
    delete: tuple[bytes, ...]

    @property
    def empty(self) -> bool:
        return not self.update and not self.delete


def plan(desired: Mapping[bytes, bytes], current: Mapping[bytes, bytes]) -> MapPlan:
    update = {k: v for k, v in desired.items() if current.get(k) != v}
    delete = tuple(sorted(k for k in current if k not in desired))
    return MapPlan(update, delete)


# -- readable form (golden files, `check` output) ---------------------------


def _ip_from(family: int, raw: bytes) -> IPAddress:
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw[:16])


def describe(name: MapName, key: bytes, value: bytes) -> str:
    """One entry in words, e.g. `ports: outbound port 22 excluded`."""
    if name == MapName.PODS:
        (flags,) = struct.unpack_from("<I", value)
        inbound = "only included ports" if flags & POD_INBOUND_INCLUDED_ONLY else "all ports"
        return f"pods: captured, inbound {inbound}"
    if name == MapName.PORTS:
        _, port, direction = struct.unpack_from("<QHB", key)
        return f"ports: {Direction(direction).name.lower()} port {port} " + (
            "excluded" if value[0] == PortVerdict.EXCLUDE else "included"
        )
    if name == MapName.CIDRS:
        prefixlen, _, family = struct.unpack_from("<IQI", key)
        ip = _ip_from(family, key[16:])
        net = ipaddress.ip_network(f"{ip}/{prefixlen - CIDR_KEY_FIXED_BITS}")
        reason = "excluded" if value[0] == CidrReason.EXCLUDED else "pod address, stays in the pod"
        return f"cidrs: outbound to {net} {reason}"
    if name == MapName.POD_ADDRS:
        (family,) = struct.unpack_from("<I", key)
        return f"pod_addrs: inbound to {_ip_from(family, key[4:])} belongs to this pod"
    raise ValueError(f"{name} is not a per-pod map")


def render(entries: Mapping[MapName, Mapping[bytes, bytes]]) -> str:
    """All entries, one per line with raw bytes, in a stable order (golden files)."""
    lines = []
    for name in POD_CONFIG_MAPS:
        for key, value in sorted(entries.get(name, {}).items()):
            lines.append(f"{name} {key.hex()} -> {value.hex()}  # {describe(name, key, value)}")
    return "\n".join(lines) + "\n"
