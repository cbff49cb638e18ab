"""What to do with a recorded pod when the agent's memory and the kernel disagree.

Pure decisions; the Enroller observes the kernel and carries them out. A
record names its pod's netns by path, inode and cookie, and the boot it was
written in. Inodes and cookies are unique only within one boot: after a
reboot the same numbers can belong to another pod's netns, so a record from
an earlier boot is never trusted to name a live netns, and capture state is
never removed by its cookie.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from node_agent.enrollment.registry import PodRecord


@dataclass(frozen=True)
class NetnsNow:
    """What is at a record's netns path now: nothing, or a netns with this inode."""

    inode: int | None


class Capture(StrEnum):
    """How to take away a recorded pod's capture."""

    # Its netns is still the one enrolled: remove the rules or entries in it.
    IN_NETNS = "in netns"
    # Its netns is gone (or replaced at the same path): forget the node-wide state
    # kept under its cookie (eBPF map entries and link pin); rules died with it.
    BY_COOKIE = "by cookie"
    # Nothing can be named safely (an earlier boot, or an agent that did not
    # record the cookie): the netns took its rules along, prune finds the rest.
    NOTHING = "nothing"


class Start(StrEnum):
    """What a starting agent does with one recorded pod."""

    # An ADD whose agent died before its last step: undo every step it may have done.
    UNDO = "undo"
    # The pod's netns went away while no agent watched: forget the pod.
    FORGET = "forget"
    # Enrolled, and its netns is the one enrolled: check capture, re-apply if drifted.
    REPAIR = "repair"


@dataclass(frozen=True)
class Decision:
    start: Start
    capture: Capture
    why: str


def same_netns(record: PodRecord, boot_id: str, now: NetnsNow) -> bool:
    """Whether the netns at the record's path is the very one the pod was enrolled in."""
    # Records of agents that kept no boot id are taken as of this boot, as they always were.
    this_boot = record.boot_id in ("", boot_id)
    return this_boot and now.inode is not None and now.inode == record.netns_inode


def capture_removal(record: PodRecord, boot_id: str, now: NetnsNow) -> Capture:
    """How to remove the pod's capture, given what is at its netns path now."""
    if same_netns(record, boot_id, now):
        return Capture.IN_NETNS
    if record.boot_id == boot_id and record.netns_cookie:
        return Capture.BY_COOKIE
    return Capture.NOTHING


def on_start(record: PodRecord, boot_id: str, now: NetnsNow) -> Decision:
    """The starting agent's decision for one recorded pod."""
    capture = capture_removal(record, boot_id, now)
    if record.boot_id not in ("", boot_id):
        return Decision(Start.FORGET, capture, "recorded before the node rebooted")
    if not record.enrolled:
        return Decision(Start.UNDO, capture, "its ADD was cut short by the agent's death")
    if now.inode is None:
        return Decision(Start.FORGET, capture, "its netns is gone")
    if now.inode != record.netns_inode:
        return Decision(
            Start.FORGET,
            capture,
            f"its netns path now holds another netns (inode {now.inode}, "
            f"enrolled in {record.netns_inode})",
        )
    return Decision(Start.REPAIR, capture, "enrolled, netns unchanged")
