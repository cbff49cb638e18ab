"""The two capture modes behind one interface, and which one a node runs.

`CaptureMode` is what the rest of Weir (the CLI today, the agent's reconcile
loop later) programs against: `IptablesCapture` and `EbpfCapture` both
satisfy it structurally. `auto` runs the eBPF preflight and uses eBPF when
it passes, iptables otherwise, and says why either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from node_agent.netns import Netns
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.ebpf.pins import PinLayout
from node_agent.redirect.ebpf.preflight import Preflight, run_preflight
from weir_common.errors import NodeSetupError

log = logging.getLogger(__name__)


class CaptureMode(Protocol):
    """Capture for one pod netns: converge, report drift, undo."""

    def apply(self, netns: Netns, config: CaptureConfig, /) -> object:
        """Make the pod's capture exactly `config` (idempotent); returns a mode-specific report."""
        ...

    def check(self, netns: Netns, config: CaptureConfig, /) -> list[str]:
        """Every difference from a working capture with `config`; empty when there is none."""
        ...

    def remove(self, netns: Netns, /) -> bool:
        """Remove the pod's capture, nothing else; whether anything was there."""
        ...


class Mode(StrEnum):
    IPTABLES = "iptables"
    EBPF = "ebpf"
    AUTO = "auto"


@dataclass(frozen=True)
class ModeChoice:
    mode: Mode  # IPTABLES or EBPF, never AUTO
    reason: str


def choose_mode(requested: Mode, preflight: Preflight | None) -> ModeChoice:
    """Decide from the request and, for ebpf/auto, the preflight's findings."""
    if requested == Mode.IPTABLES:
        return ModeChoice(Mode.IPTABLES, "requested explicitly")
    if preflight is None:
        raise ValueError(f"mode {requested} needs the eBPF preflight")
    if requested == Mode.EBPF:
        if not preflight.ok:
            raise NodeSetupError(
                "eBPF mode requested, but this node cannot run it: "
                + "; ".join(preflight.failures())
            )
        return ModeChoice(Mode.EBPF, "requested explicitly")
    if preflight.ok:
        return ModeChoice(Mode.EBPF, "auto: the eBPF preflight passed")
    return ModeChoice(
        Mode.IPTABLES,
        "auto: eBPF preflight failed (" + "; ".join(preflight.failures()) + "), using iptables",
    )


def select_mode(requested: Mode, pins: PinLayout) -> tuple[ModeChoice, Preflight | None]:
    """Run the preflight when the request needs it, choose, and log the choice."""
    preflight = None if requested == Mode.IPTABLES else run_preflight(pins)
    try:
        choice = choose_mode(requested, preflight)
    except BaseException:
        if preflight is not None and preflight.compiled is not None:
            preflight.compiled.close()
        raise
    if choice.mode != Mode.EBPF and preflight is not None and preflight.compiled is not None:
        preflight.compiled.close()
        preflight.compiled = None
    fell_back = requested == Mode.AUTO and choice.mode == Mode.IPTABLES
    level = logging.WARNING if fell_back else logging.INFO
    log.log(level, "capture mode: %s (%s)", choice.mode, choice.reason)
    return choice, preflight
