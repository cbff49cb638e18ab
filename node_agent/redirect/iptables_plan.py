"""From (desired, current) to the iptables-restore script that converges them.

Pure: the current state comes in as parsed iptables-save output, so every
decision here is testable without a kernel. The script is for
`iptables-restore --noflush`, which commits each table atomically: a pod
never sees half of our chains. When current already equals desired the
script is empty and nothing is run, which is what makes re-apply a no-op.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from node_agent.redirect.iptables_model import OwnedTable


def _jumps_by_chain(table: OwnedTable) -> dict[str, list[str]]:
    by_chain: dict[str, list[str]] = {}
    for chain, rule in table.jumps:
        by_chain.setdefault(chain, []).append(rule)
    return by_chain


def _table_script(name: str, desired: OwnedTable, current: OwnedTable) -> list[str]:
    changed = [c for c, rules in desired.chains.items() if current.chains.get(c) != rules]
    stale = [c for c in current.chains if c not in desired.chains]
    jumps_ok = _jumps_by_chain(desired) == _jumps_by_chain(current)
    if not changed and not stale and jumps_ok:
        return []
    # Declaring a chain creates it, or flushes it when it exists (even with
    # --noflush), so a changed chain is rebuilt in the same transaction.
    lines = [f"*{name}"] + [f":{c} - [0:0]" for c in changed]
    if not jumps_ok:
        # Deleting by full rule spec removes exactly our rules, however other
        # tools have numbered theirs around them; duplicates go one by one.
        lines += [f"-D {chain} {rule}" for chain, rule in current.jumps]
        for chain, rules in _jumps_by_chain(desired).items():
            # Our jumps go first so no other rule in the chain can bypass capture.
            lines += [f"-I {chain} {pos} {rule}" for pos, rule in enumerate(rules, 1)]
    for chain in changed:
        lines += [f"-A {chain} {rule}" for rule in desired.chains[chain]]
    for chain in stale:
        lines += [f"-F {chain}", f"-X {chain}"]
    lines.append("COMMIT")
    return lines


def reconcile_script(desired: Mapping[str, OwnedTable], current: Mapping[str, OwnedTable]) -> str:
    """The `iptables-restore --noflush` input turning `current` into `desired` ("" if equal)."""
    lines: list[str] = []
    for name in sorted(set(desired) | set(current)):
        lines += _table_script(
            name, desired.get(name, OwnedTable()), current.get(name, OwnedTable())
        )
    return "\n".join(lines) + "\n" if lines else ""


def differences(desired: Mapping[str, OwnedTable], current: Mapping[str, OwnedTable]) -> list[str]:
    """Human-readable drift between what should be installed and what is."""
    out: list[str] = []
    for name in sorted(set(desired) | set(current)):
        want, have = desired.get(name, OwnedTable()), current.get(name, OwnedTable())
        for chain, rules in want.chains.items():
            if chain not in have.chains:
                out.append(f"{name}/{chain}: chain missing")
            elif have.chains[chain] != rules:
                diff = difflib.unified_diff(
                    list(have.chains[chain]), list(rules), "installed", "expected", lineterm="", n=0
                )
                out.append(f"{name}/{chain}: rules differ")
                out += [f"    {line}" for line in diff if not line.startswith("@@")]
        out += [
            f"{name}/{chain}: unexpected chain" for chain in have.chains if chain not in want.chains
        ]
        want_jumps, have_jumps = _jumps_by_chain(want), _jumps_by_chain(have)
        for chain in sorted(set(want_jumps) | set(have_jumps)):
            for rule in want_jumps.get(chain, []):
                count = have_jumps.get(chain, []).count(rule)
                if count == 0:
                    out.append(f"{name}/{chain}: missing jump: {rule}")
                elif count > 1:
                    out.append(f"{name}/{chain}: jump installed {count} times: {rule}")
            out += [
                f"{name}/{chain}: unexpected jump: {rule}"
                for rule in have_jumps.get(chain, [])
                if rule not in want_jumps.get(chain, [])
            ]
    return out
