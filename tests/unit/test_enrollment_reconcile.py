"""What a starting agent does with each recorded pod, and how a pod's capture is taken away.

Pure decisions (node_agent/enrollment/reconcile.py) over a record and what
is at its netns path now; plus the registry's part: it keeps the netns
cookie and boot across restarts, reads records of older agents, and drops
the temporary file of a write a kill -9 cut short.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from node_agent.enrollment.reconcile import (
    Capture,
    NetnsNow,
    Start,
    capture_removal,
    on_start,
    same_netns,
)
from node_agent.enrollment.registry import PodRecord, PodRegistry
from node_agent.redirect.config import CaptureConfig
from weir_common.atomic_file import TEMP_SUFFIX

BOOT = "0b7c4f0e-6a1d-4b8e-9d61-3f0c2a6e1b11"
EARLIER_BOOT = "5d2e9a70-1c3b-4f6e-8a42-7b9d0e1f2c33"
INODE = 4026532001
COOKIE = 8193

RECORD = PodRecord(
    uid="u1",
    namespace="default",
    name="app",
    service_account="app",
    container_id="c1",
    netns="/var/run/netns/cni-1",
    netns_inode=INODE,
    ips=("10.244.1.5/24",),
    capture=CaptureConfig(),
    mode="ebpf",
    enrolled=True,
    netns_cookie=COOKIE,
    boot_id=BOOT,
)
IN_FLIGHT = dataclasses.replace(RECORD, enrolled=False)
# As an agent that recorded neither the cookie nor the boot wrote it.
LEGACY = dataclasses.replace(RECORD, netns_cookie=0, boot_id="")

SAME = NetnsNow(INODE)
GONE = NetnsNow(None)
REPLACED = NetnsNow(INODE + 7)


@pytest.mark.parametrize(
    ("record", "now", "start", "capture"),
    [
        (RECORD, SAME, Start.REPAIR, Capture.IN_NETNS),
        (RECORD, GONE, Start.FORGET, Capture.BY_COOKIE),
        (RECORD, REPLACED, Start.FORGET, Capture.BY_COOKIE),
        (IN_FLIGHT, SAME, Start.UNDO, Capture.IN_NETNS),
        (IN_FLIGHT, GONE, Start.UNDO, Capture.BY_COOKIE),
        (IN_FLIGHT, REPLACED, Start.UNDO, Capture.BY_COOKIE),
        (dataclasses.replace(RECORD, netns_cookie=0), GONE, Start.FORGET, Capture.NOTHING),
        (LEGACY, SAME, Start.REPAIR, Capture.IN_NETNS),
        (LEGACY, GONE, Start.FORGET, Capture.NOTHING),
        (dataclasses.replace(LEGACY, enrolled=False), SAME, Start.UNDO, Capture.IN_NETNS),
    ],
)
def test_decisions_in_this_boot(record, now, start, capture):
    decision = on_start(record, BOOT, now)
    assert (decision.start, decision.capture) == (start, capture)
    assert capture_removal(record, BOOT, now) == capture


@pytest.mark.parametrize("record", [RECORD, IN_FLIGHT])
@pytest.mark.parametrize("now", [SAME, GONE, REPLACED])
def test_a_record_from_before_a_reboot_names_nothing(record, now):
    """Inodes and cookies restart with the kernel: the same numbers may be another pod's."""
    rebooted = dataclasses.replace(record, boot_id=EARLIER_BOOT)
    decision = on_start(rebooted, BOOT, now)
    assert decision.start == Start.FORGET
    assert decision.capture == Capture.NOTHING
    assert decision.why == "recorded before the node rebooted"
    assert not same_netns(rebooted, BOOT, now)


def test_reasons_say_what_was_found():
    assert on_start(RECORD, BOOT, GONE).why == "its netns is gone"
    assert on_start(RECORD, BOOT, REPLACED).why == (
        f"its netns path now holds another netns (inode {INODE + 7}, enrolled in {INODE})"
    )
    assert on_start(IN_FLIGHT, BOOT, SAME).why == "its ADD was cut short by the agent's death"


def test_same_netns_needs_the_same_inode_in_this_boot():
    assert same_netns(RECORD, BOOT, SAME)
    assert same_netns(LEGACY, BOOT, SAME)
    assert not same_netns(RECORD, BOOT, GONE)
    assert not same_netns(RECORD, BOOT, REPLACED)


def test_the_registry_keeps_cookie_and_boot_and_reads_older_records(tmp_path):
    path = tmp_path / "pods.json"
    first = PodRegistry(path)
    first.load()
    first.put(RECORD)
    again = PodRegistry(path)
    again.load()
    assert again.get("u1") == RECORD

    body = json.loads(path.read_text())
    for pod in body["pods"]:
        del pod["netns_cookie"], pod["boot_id"]
    path.write_text(json.dumps(body))
    older = PodRegistry(path)
    older.load()
    assert older.get("u1") == LEGACY


def test_load_drops_the_temporary_file_of_a_write_cut_short(tmp_path):
    path = tmp_path / "pods.json"
    registry = PodRegistry(path)
    registry.load()
    registry.put(RECORD)
    # What a kill -9 between writing the temporary file and renaming it leaves.
    stale = tmp_path / f".pods.json.x1y2z3{TEMP_SUFFIX}"
    stale.write_text('{"version": 1, "pods": []}')
    other = tmp_path / f".other.json.x1y2z3{TEMP_SUFFIX}"
    other.write_text("not ours")
    restarted = PodRegistry(path)
    restarted.load()
    assert restarted.get("u1") == RECORD
    assert not stale.exists()
    assert other.exists()
