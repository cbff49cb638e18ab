"""Applying, checking and removing capture rules in a pod netns.

The thin adapter around the pure parts: read with `*-save`, plan with
`iptables_plan`, write with `*-restore --noflush`. Apply goes through
iptables-restore rather than python-iptables because restore commits a whole
table in one transaction, speaks both backends (libiptc, which
python-iptables binds, is legacy-only), and takes the same text that
`--dry-run` prints and the golden files pin.

Failure modes: nothing is written before every read succeeded; if the IPv6
write fails after the IPv4 one succeeded, IPv4 is put back as it was, so an
apply either fully happens or leaves the netns unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from node_agent import netns as netns_mod
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend, require_tools, tool
from node_agent.redirect.config import FAMILIES, CaptureConfig, Family
from node_agent.redirect.iptables_model import OwnedTable, owned_tables
from node_agent.redirect.iptables_plan import differences, reconcile_script
from node_agent.redirect.iptables_rules import capture_rules
from weir_common.errors import TransientError, WeirError

log = logging.getLogger(__name__)

Ruleset = Mapping[str, OwnedTable]


class RestoreError(TransientError):
    """iptables-restore refused our script; the netns was left as it was."""


@dataclass(frozen=True)
class ApplyReport:
    backend: Backend
    changed: dict[Family, bool]
    # Families whose stale Weir rules were removed from the other backend.
    cleaned_other_backend: list[Family] = field(default_factory=list)


def dry_run_text(config: CaptureConfig, backend: Backend) -> str:
    """The exact restore input apply would run against a netns holding none of our rules."""
    parts = []
    for family in FAMILIES:
        script = reconcile_script(capture_rules(config, family), {})
        parts.append(f"# IPv{family}: {tool(backend, family, 'restore')} --noflush\n{script}")
    return "".join(parts)


def read_owned(ns: Netns, family: Family, backend: Backend) -> Ruleset:
    """Weir's rules, per table, in one family of one backend of `ns`."""
    proc = netns_mod.run(ns, [tool(backend, family, "save")])
    if proc.returncode != 0:
        raise TransientError(
            f"{tool(backend, family, 'save')} in {ns.path} failed: {proc.stderr.strip()}"
        )
    return owned_tables(proc.stdout)


def _write(ns: Netns, family: Family, backend: Backend, script: str) -> None:
    # -w: legacy iptables takes a host-wide lock; wait for it rather than fail.
    argv = [tool(backend, family, "restore"), "--noflush", "-w", "10"]
    log.debug("running %s in %s:\n%s", argv[0], ns.path, script)
    proc = netns_mod.run(ns, argv, stdin=script)
    if proc.returncode != 0:
        raise RestoreError(f"{argv[0]} in {ns.path} failed: {proc.stderr.strip()}")


def converge(
    ns: Netns,
    backend: Backend,
    desired: Mapping[Family, Ruleset],
    scope: Callable[[Ruleset], Ruleset] = lambda owned: owned,
) -> dict[Family, bool]:
    """Make the part of Weir's rules that `scope` selects exactly `desired`, per family.

    Either every family converges or each is put back as it was. `scope`
    narrows what counts as current, so a caller owning a few chains of a
    shared netns (the node's) never touches Weir's other chains there.
    """
    before = {family: scope(read_owned(ns, family, backend)) for family in FAMILIES}
    done: list[Family] = []
    try:
        for family in FAMILIES:
            script = reconcile_script(desired[family], before[family])
            if script:
                _write(ns, family, backend, script)
                done.append(family)
    except WeirError:
        for family in done:
            now = scope(read_owned(ns, family, backend))
            _write(ns, family, backend, reconcile_script(before[family], now))
        raise
    return {family: family in done for family in FAMILIES}


def other_backend(backend: Backend) -> Backend | None:
    """The other backend when its tools are installed: where stale rules of ours may sit."""
    other = Backend.LEGACY if backend == Backend.NFT else Backend.NFT
    try:
        require_tools(other)
    except WeirError:
        return None
    return other


class IptablesCapture:
    """Capture rules in pod netns through one backend, with cleanup of the other."""

    def __init__(self, backend: Backend) -> None:
        require_tools(backend)
        self.backend = backend
        self._other = other_backend(backend)

    def apply(self, ns: Netns, config: CaptureConfig) -> ApplyReport:
        desired = {family: capture_rules(config, family) for family in FAMILIES}
        changed = converge(ns, self.backend, desired)
        cleaned: list[Family] = []
        if self._other is not None:
            # Rules left in the other backend (an upgrade that switched backends,
            # an override changed by the operator) would capture traffic twice.
            stale = {family: read_owned(ns, family, self._other) for family in FAMILIES}
            if any(stale.values()):
                empty: dict[Family, Ruleset] = {family: {} for family in FAMILIES}
                cleaned_map = converge(ns, self._other, empty)
                cleaned = [family for family, did in cleaned_map.items() if did]
                log.warning("removed stale Weir rules from iptables-%s in %s", self._other, ns.path)
        return ApplyReport(self.backend, changed, cleaned)

    def check(self, ns: Netns, config: CaptureConfig) -> list[str]:
        """Drift between expected and installed rules; empty when exactly as expected."""
        problems: list[str] = []
        for family in FAMILIES:
            installed = read_owned(ns, family, self.backend)
            problems += [
                f"IPv{family} {line}"
                for line in differences(capture_rules(config, family), installed)
            ]
            if self._other is not None and read_owned(ns, family, self._other):
                problems.append(
                    f"IPv{family}: Weir rules also present in iptables-{self._other}; "
                    "both rulesets run (re-apply to remove them)"
                )
        return problems

    def prune(self) -> list[str]:
        """Nothing to forget: the rules live in the pod's netns and vanish with it."""
        return []

    def forget(self, netns_cookie: int) -> bool:  # noqa: ARG002 - CaptureEngine
        """Nothing outside the pod's netns to drop: its rules went with it."""
        return False

    def remove(self, ns: Netns) -> bool:
        """Remove every Weir rule and chain from both backends. Whether anything was removed."""
        empty: dict[Family, Ruleset] = {family: {} for family in FAMILIES}
        changed = any(converge(ns, self.backend, empty).values())
        if self._other is not None:
            changed |= any(converge(ns, self._other, empty).values())
        return changed
