"""eBPF state that outlives its purpose: pods whose netns went without a DEL, pins of another Weir.

Each test installs under a pin root of its own (beside, never inside,
/sys/fs/bpf/weir) and removes it whatever happens; pods are namespaces of
the test's own topology.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_agent import netns as netns_mod
from node_agent.constants import INBOUND_PLAINTEXT_CAPTURE_PORT
from node_agent.localmesh.topology import Pod
from node_agent.redirect.config import CaptureConfig, parse_cidrs
from node_agent.redirect.ebpf import loader, sys_bpf
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.maps import (
    LAYOUT_VERSION,
    MAP_SPECS,
    META_MAP,
    META_SPEC,
    POD_CONFIG_MAPS,
    MapName,
    MapSpec,
    encode_layout_version,
    key_cookie,
)
from node_agent.redirect.ebpf.pins import PinLayout
from node_agent.redirect.ebpf.sys_bpf import MapType
from node_agent.redirect.podnet import netns_cookie
from weir_common.errors import NodeSetupError

pytestmark = pytest.mark.netns

WEIR = str(Path(sys.executable).with_name("weir"))
# Entries in every per-pod map: ports, CIDRs, the pod's address, the pod, its listener.
CONFIG = CaptureConfig(
    exclude_outbound_ports=(22,),
    exclude_inbound_ports=(9090,),
    exclude_outbound_cidrs=parse_cidrs(["169.254.169.254"], "test"),
)


def pod_entries_in_maps(pins: PinLayout, cookie: int) -> list[str]:
    """Every entry of the pod's in the per-pod maps, as `map key-hex`, read from the pins."""
    found = []
    for name in (*POD_CONFIG_MAPS, MapName.LISTENERS):
        spec = MAP_SPECS[name]
        fd = sys_bpf.obj_get(str(pins.map(name)))
        try:
            for key in list(sys_bpf.map_keys(fd, spec.key_size)):
                value = sys_bpf.map_lookup(fd, key, spec.value_size)
                if value is not None and key_cookie(name, key, value) == cookie:
                    found.append(f"{name} {key.hex()}")
        finally:
            os.close(fd)
    return sorted(found)


@contextlib.contextmanager
def proxy_listener(pod: Pod) -> Iterator[None]:
    """The proxy's inbound listener in the pod, which apply registers in weir_listeners."""
    with netns_mod.entered(pod.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", INBOUND_PLAINTEXT_CAPTURE_PORT))
        sock.listen(8)
        yield


def wait_for_netns_teardown(link: Path) -> None:
    """The kernel detaches a netns link when it frees the netns, in a worker, soon after."""
    fd = sys_bpf.obj_get(str(link))
    try:
        hang_guard = time.monotonic() + 120
        while sys_bpf.link_info(fd).target != 0:
            assert time.monotonic() < hang_guard, f"{link} never lost its netns"
            time.sleep(0.05)
    finally:
        os.close(fd)


def test_prune_forgets_every_pod_whose_netns_is_gone_and_only_those(pins, topology):
    node = topology.add_node("node-1", "10.244.1.0/24")
    names = ("live", "gone", "gone-unlinked", "live-unlinked")
    pods = {name: topology.add_pod(node, name) for name in names}
    cookies = {name: netns_cookie(pod.netns) for name, pod in pods.items()}
    gone = ("gone", "gone-unlinked")
    with (
        contextlib.ExitStack() as kept,
        contextlib.ExitStack() as lost,
        EbpfCapture(pins) as capture,
    ):
        for name, pod in pods.items():
            (lost if name in gone else kept).enter_context(proxy_listener(pod))
            capture.apply(pod.netns, CONFIG)
            in_maps = {entry.split()[0] for entry in pod_entries_in_maps(pins, cookies[name])}
            assert in_maps == {*POD_CONFIG_MAPS, MapName.LISTENERS}, name
        # Entries without a link: an apply cut short, or an agent from before links came first.
        for name in ("gone-unlinked", "live-unlinked"):
            pins.pod_link(cookies[name]).unlink()
        before = {name: pod_entries_in_maps(pins, cookies[name]) for name in names}
        lost.close()  # a pod's proxy listener goes with its netns, and leaves weir_listeners
        for name in gone:
            topology.remove_pod(pods[name])  # bridge DEL, netns deleted; Weir is told nothing
        wait_for_netns_teardown(pins.pod_link(cookies["gone"]))

        removed = capture.prune()

        assert sorted(removed) == sorted(
            f"pod netns cookie {cookies[name]} (netns gone): removed "
            f"{len(before[name]) - 1} map entries{link}"
            for name, link in (("gone", " and its sk_lookup link"), ("gone-unlinked", ""))
        )
        for name in gone:
            assert pod_entries_in_maps(pins, cookies[name]) == [], name
            assert not pins.pod_link(cookies[name]).exists(), name
        for name in ("live", "live-unlinked"):
            assert pod_entries_in_maps(pins, cookies[name]) == before[name], name
        assert capture.check(pods["live"].netns, CONFIG) == []
        assert capture.prune() == []


def _pinned_ids(pins: PinLayout) -> dict[str, int]:
    ids = {}
    for pin in pins.all_pins():
        fd = sys_bpf.obj_get(str(pin))
        try:
            if pin.parent.name == "maps":
                ids[str(pin)] = sys_bpf.map_info(fd).id
            elif pin.parent.name == "progs":
                ids[str(pin)] = sys_bpf.prog_info(fd).id
            else:
                ids[str(pin)] = sys_bpf.link_info(fd).id
        finally:
            os.close(fd)
    return ids


def _pin_map(pins: PinLayout, name: str, spec: MapSpec) -> None:
    """Replace the map pinned at `name` by one of shape `spec`, as another Weir would have made."""
    pins.map(name).unlink()
    fd = sys_bpf.map_create(
        MapType(spec.type), spec.key_size, spec.value_size, spec.max_entries, name
    )
    try:
        sys_bpf.obj_pin(fd, str(pins.map(name)))
    finally:
        os.close(fd)


def _set_layout_version(pins: PinLayout, version: int) -> None:
    fd = sys_bpf.obj_get(str(pins.map(META_MAP)))
    try:
        sys_bpf.map_update(fd, bytes(META_SPEC.key_size), encode_layout_version(version))
    finally:
        os.close(fd)


def _shape(name: MapName, **change: int) -> MapSpec:
    spec = MAP_SPECS[name]
    fields = {f: getattr(spec, f) for f in ("type", "key_size", "value_size", "max_entries")}
    return MapSpec(**{**fields, **change})


INCOMPATIBLE: dict[str, tuple[Callable[[PinLayout], None], str]] = {
    "value size": (
        lambda p: _pin_map(p, MapName.PODS, _shape(MapName.PODS, value_size=16)),
        "weir_pods: value size 16, expected 8",
    ),
    "key size": (
        lambda p: _pin_map(p, MapName.PORTS, _shape(MapName.PORTS, key_size=12)),
        "weir_ports: key size 12, expected 16",
    ),
    "max_entries": (
        lambda p: _pin_map(p, MapName.POD_ADDRS, _shape(MapName.POD_ADDRS, max_entries=1024)),
        "weir_pod_addrs: max_entries 1024, expected 16384",
    ),
    "map type": (
        lambda p: _pin_map(p, MapName.SOCK_DST, _shape(MapName.SOCK_DST, type=MapType.HASH)),
        "weir_sock_dst: map type hash, expected lru_hash",
    ),
    "layout version": (
        lambda p: _set_layout_version(p, LAYOUT_VERSION + 1),
        f"layout version {LAYOUT_VERSION + 1}, this agent's is {LAYOUT_VERSION}",
    ),
    "no layout version": (
        lambda p: p.map(META_MAP).unlink(),
        "weir_meta: missing (pinned by a Weir agent from before layout versions)",
    ),
}


@pytest.mark.parametrize("case", INCOMPATIBLE)
def test_incompatible_pins_are_refused_saying_what_differs_and_left_alone(pins, bare_netns, case):
    make_incompatible, said = INCOMPATIBLE[case]
    loader.install(pins)
    make_incompatible(pins)
    before = _pinned_ids(pins)

    with pytest.raises(NodeSetupError) as refused:
        loader.install(pins)
    assert said in refused.value.message
    assert f"weir redirect uninstall-ebpf --bpf-pin-root {pins.root}" in refused.value.message
    with EbpfCapture(pins) as capture, pytest.raises(NodeSetupError, match=re.escape(said)):
        capture.apply(bare_netns, CaptureConfig())
    with EbpfCapture(pins) as capture, pytest.raises(NodeSetupError, match=re.escape(said)):
        capture.remove(bare_netns)
    with EbpfCapture(pins) as capture:
        assert any(said in line for line in capture.check(bare_netns, CaptureConfig()))
    root = ["--bpf-pin-root", str(pins.root)]
    cli = subprocess.run(
        [WEIR, "redirect", "apply", "--mode", "ebpf", "--netns", str(bare_netns.path), *root],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 1
    assert said in cli.stderr
    assert "uninstall-ebpf" in cli.stderr
    assert _pinned_ids(pins) == before, "an incompatible install must be left exactly as it was"
    assert pod_entries_in_maps(pins, netns_cookie(bare_netns)) == []

    # The way out the message gives.
    subprocess.run([WEIR, "redirect", "uninstall-ebpf", *root], check=True, capture_output=True)
    with EbpfCapture(pins) as capture:
        capture.apply(bare_netns, CaptureConfig())
        assert capture.check(bare_netns, CaptureConfig()) == []


def test_a_compatible_install_is_reused_as_it_is(pins):
    assert loader.install(pins).installed_now
    before = _pinned_ids(pins)
    again = loader.install(pins)
    assert not again.installed_now
    assert _pinned_ids(pins) == before
