"""Rulesets as plain values, and the parser of `iptables-save` output.

A ruleset here is only what Weir owns in a table: its chains (by the
`WEIR-` prefix) and the jump rules that lead into them from the built-in
chains. Everything else a parser finds belongs to someone else and is only
read, never rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from node_agent.constants import CHAIN_PREFIX
from weir_common.errors import WeirError

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


@dataclass(frozen=True)
class OwnedTable:
    """Weir's part of one table.

    `chains` maps each of our chains to its rules in order; `jumps` lists
    (built-in chain, rule) pairs that send traffic into our chains. Rules are
    in the canonical form iptables-save prints (`-p tcp -m tcp --dport 80`),
    so a ruleset read back compares equal to the one rendered.
    """

    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    jumps: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.chains and not self.jumps


@dataclass
class SavedTable:
    """One table as iptables-save printed it (all of it, ours or not)."""

    name: str
    chain_order: list[str] = field(default_factory=list)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def owned(self) -> OwnedTable:
        chains = {
            c: tuple(self.rules.get(c, [])) for c in self.chain_order if c.startswith(CHAIN_PREFIX)
        }
        jumps = tuple(
            (c, rule)
            for c in self.chain_order
            if c in BUILTIN_CHAINS
            for rule in self.rules.get(c, [])
            if _target(rule).startswith(CHAIN_PREFIX)
        )
        return OwnedTable(chains=chains, jumps=jumps)


class SaveParseError(WeirError):
    """iptables-save printed something we do not understand; nothing is changed."""


def _target(rule: str) -> str:
    words = rule.split()
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "-g"):
            return words[i + 1]
    return ""


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse iptables-save / ip6tables-save output (either backend) into tables."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        # iptables-nft-save appends warnings such as "# Warning: iptables-legacy
        # tables present" as comments; comments never carry rules.
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable(name=line[1:]))
        elif current is None:
            raise SaveParseError(f"iptables-save line {lineno}: {line!r} outside any table")
        elif line == "COMMIT":
            current = None
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            current.chain_order.append(chain)
            current.rules.setdefault(chain, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            if chain not in current.rules:
                raise SaveParseError(f"iptables-save line {lineno}: rule for undeclared {chain}")
            current.rules[chain].append(rest[0] if rest else "")
        else:
            raise SaveParseError(f"iptables-save line {lineno}: unexpected {line!r}")
    return tables


def owned_tables(text: str) -> dict[str, OwnedTable]:
    """Weir's rules, per table, in an iptables-save dump; tables without any are left out."""
    found = {name: t.owned() for name, t in parse_save(text).items()}
    return {name: t for name, t in found.items() if not t.empty}
