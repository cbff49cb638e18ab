"""The eBPF mode's pure parts: map encodings, a pod's entries, the C header, mode choice."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from node_agent.redirect.config import CaptureConfig, parse_cidrs
from node_agent.redirect.ebpf.loader import explain_load_failure
from node_agent.redirect.ebpf.maps import (
    MAP_SPECS,
    POD_CONFIG_MAPS,
    MapName,
    MapSpec,
    config_header,
    encode_listener_key,
    key_cookie,
    plan,
    pod_entries,
    render,
    spec_differences,
)
from node_agent.redirect.ebpf.pins import Mount, cgroup2_mount, mount_of, parse_mountinfo
from node_agent.redirect.ebpf.preflight import Finding, Preflight
from node_agent.redirect.modes import Mode, ModeChoice, choose_mode
from node_agent.redirect.podnet import TCP_LISTEN, parse_proc_net_tcp
from weir_common.errors import NodeSetupError

COOKIE = 0x1122334455667788
ADDRESSES = [ipaddress.ip_address("10.244.1.2"), ipaddress.ip_address("fd00:244:1::2")]
CONFIGS = {
    "default": CaptureConfig(),
    "exclusions": CaptureConfig(
        exclude_outbound_ports=(22, 443),
        exclude_inbound_ports=(9090,),
        exclude_outbound_cidrs=parse_cidrs(
            ["169.254.169.254", "10.96.0.0/12", "fd00:96::/108"], "x"
        ),
    ),
    "include-inbound": CaptureConfig(
        include_inbound_ports=(8080, 9090), exclude_inbound_ports=(9090,)
    ),
}


def test_config_header(golden):
    golden("ebpf/weir_config.h", config_header())


@pytest.mark.parametrize("name", CONFIGS)
def test_pod_entries(golden, name):
    golden(f"ebpf/pod-{name}.txt", render(pod_entries(COOKIE, CONFIGS[name], ADDRESSES)))


@pytest.mark.parametrize("name", CONFIGS)
def test_applying_the_plan_twice_changes_nothing(name):
    desired = pod_entries(COOKIE, CONFIGS[name], ADDRESSES)
    other = pod_entries(COOKIE, CONFIGS["exclusions" if name != "exclusions" else "default"], [])
    for m in POD_CONFIG_MAPS:
        current = dict(other[m])
        step = plan(desired[m], current)
        current.update(step.update)
        for key in step.delete:
            del current[key]
        assert current == desired[m]
        assert plan(desired[m], current).empty


def test_entries_have_the_sizes_pinned_maps_are_checked_against():
    entries = pod_entries(COOKIE, CONFIGS["exclusions"], ADDRESSES)
    for name in POD_CONFIG_MAPS:
        spec = MAP_SPECS[name]
        for key, value in entries[name].items():
            assert (len(key), len(value)) == (spec.key_size, spec.value_size), name
    assert len(encode_listener_key(COOKIE, 2)) == MAP_SPECS[MapName.LISTENERS].key_size


def test_spec_differences_name_each_one():
    expected = MAP_SPECS[MapName.CIDRS]
    assert spec_differences("weir_cidrs", expected, expected) == []
    assert spec_differences("weir_cidrs", MapSpec(1, 32, 8, 10, 0), expected) == [
        "weir_cidrs: map type hash, expected lpm_trie",
        "weir_cidrs: value size 8, expected 1",
        "weir_cidrs: max_entries 10, expected 65536",
        "weir_cidrs: flags 0, expected 1",
    ]
    assert spec_differences("x", MapSpec(99, 32, 1, 65536, 1), expected) == [
        "x: map type 99, expected lpm_trie"
    ]


def test_equal_configs_give_equal_entries():
    shuffled = CaptureConfig(exclude_outbound_ports=(443, 22, 22))
    assert pod_entries(COOKIE, shuffled, ADDRESSES[::-1]) == pod_entries(
        COOKIE, CaptureConfig(exclude_outbound_ports=(22, 443)), ADDRESSES
    )


def test_every_entry_belongs_to_its_pod():
    """Apply, check and remove find a pod's entries by cookie; a neighbour's are never touched."""
    for cookie in (COOKIE, 7):
        entries = pod_entries(cookie, CONFIGS["exclusions"], ADDRESSES)
        for name in POD_CONFIG_MAPS:
            for key, value in entries[name].items():
                assert key_cookie(name, key, value) == cookie


def test_excluding_an_included_port_wins():
    entries = render(pod_entries(COOKIE, CONFIGS["include-inbound"], []))
    assert "inbound port 9090 excluded" in entries
    assert "inbound port 9090 included" not in entries


HYBRID_MOUNTINFO = r"""24 29 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 24 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 24 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
51 24 0:41 / /mnt/with\040space rw - tmpfs tmpfs rw
"""


def test_cgroup2_found_in_hybrid_mode_from_mountinfo():
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    assert cgroup2_mount(mounts) == Mount(Path("/sys/fs/cgroup/unified"), "/", "cgroup2")
    assert Mount(Path("/mnt/with space"), "/", "tmpfs") in mounts


def test_no_cgroup2_says_what_to_do():
    mounts = [m for m in parse_mountinfo(HYBRID_MOUNTINFO) if m.fstype != "cgroup2"]
    with pytest.raises(NodeSetupError, match="no cgroup v2 hierarchy is mounted"):
        cgroup2_mount(mounts)


def test_pin_root_is_found_on_bpffs():
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    assert mount_of(Path("/sys/fs/bpf/weir/maps"), mounts).fstype == "bpf"
    assert mount_of(Path("/sys/kernel"), mounts).fstype == "sysfs"


def test_missing_helper_is_named():
    log = (
        "0: (85) call bpf_get_netns_cookie#122\n"
        "program of this type cannot use helper bpf_get_netns_cookie#122\n"
    )
    message = explain_load_failure("the kernel refused program x", log)
    assert "lacks a helper" in message
    assert message.endswith("cannot use helper bpf_get_netns_cookie#122")


HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
TAIL = "00000000:00000000 00:00000000 00000000     0        0"
PROC_TCP = "\n".join(
    [
        HEADER,
        f"   0: 00000000:3A9E 00000000:0000 0A {TAIL} 4242 1 0 100 0 0 10 0",
        f"   1: 0100007F:3A99 0201F40A:A4C2 01 {TAIL} 4343 1 0 20 4 30 10 -1",
    ]
)
MAPPED_LOCAL = "0000000000000000FFFF00000100007F:3A99"
MAPPED_REMOTE = "0000000000000000FFFF00000201F40A:A4C2"
PROC_TCP6 = f"{HEADER}\n   0: {MAPPED_LOCAL} {MAPPED_REMOTE} 01 {TAIL} 77 1 0 20 4 30 10 -1\n"


def test_proc_net_tcp_parsing():
    listener, conn = parse_proc_net_tcp(PROC_TCP, 4)
    assert (listener.state, listener.local[1], listener.inode) == (TCP_LISTEN, 15006, 4242)
    assert conn.local == (ipaddress.ip_address("127.0.0.1"), 15001)
    assert conn.remote == (ipaddress.ip_address("10.244.1.2"), 42178)
    (mapped,) = parse_proc_net_tcp(PROC_TCP6, 6)
    assert mapped.remote == (ipaddress.ip_address("::ffff:10.244.1.2"), 42178)


def preflight(ok: bool) -> Preflight:
    return Preflight([Finding("cgroup v2", ok, "root at /x" if ok else "none mounted")])


def test_mode_choice():
    assert choose_mode(Mode.IPTABLES, None) == ModeChoice(Mode.IPTABLES, "requested explicitly")
    assert choose_mode(Mode.EBPF, preflight(True)).mode == Mode.EBPF
    assert choose_mode(Mode.AUTO, preflight(True)).mode == Mode.EBPF
    fallback = choose_mode(Mode.AUTO, preflight(False))
    assert fallback == ModeChoice(
        Mode.IPTABLES, "auto: eBPF preflight failed (cgroup v2: none mounted), using iptables"
    )
    with pytest.raises(NodeSetupError, match="cannot run it: cgroup v2: none mounted"):
        choose_mode(Mode.EBPF, preflight(False))


def test_map_names_fit_the_kernel():
    assert all(len(m.value) <= 15 for m in MapName)
