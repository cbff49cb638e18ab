"""Which iptables backend to program: nft or legacy.

Both backends can be present, and rules written through the wrong one are
invisible to the other: the kernel then runs both rulesets, and nobody sees
the whole picture. The rule peers converged on (kube-proxy, Istio): an
explicit choice always wins; otherwise follow whichever backend already holds
rules on the host, since that is what the node's other tools use; otherwise
nft, the default on current distributions.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from weir_common.errors import NodeSetupError


class Backend(StrEnum):
    NFT = "nft"
    LEGACY = "legacy"


@dataclass(frozen=True)
class BackendChoice:
    backend: Backend
    reason: str


def choose_backend(
    override: Backend | None, host_rules: Mapping[Backend, int | None]
) -> BackendChoice:
    """Decide from what the host holds. `host_rules[b]` is None when `b` is not usable."""
    usable = [b for b in (Backend.NFT, Backend.LEGACY) if host_rules.get(b) is not None]
    if override is not None:
        if override not in usable:
            raise NodeSetupError(
                f"iptables backend {override} was requested but is not usable on this node "
                f"(iptables-{override}-restore/-save missing or failing)"
            )
        return BackendChoice(override, "requested explicitly")
    if not usable:
        raise NodeSetupError(
            "no usable iptables backend: neither iptables-nft nor iptables-legacy works "
            "(install the iptables package)"
        )
    counts = {b: host_rules[b] or 0 for b in usable}
    holding = [b for b in usable if counts[b] > 0]
    if len(holding) == 1:
        b = holding[0]
        return BackendChoice(b, f"the host's rules are in iptables-{b} ({counts[b]} rules)")
    if len(holding) == 2:
        b = max(holding, key=lambda x: (counts[x], x == Backend.NFT))
        return BackendChoice(
            b,
            f"both backends hold host rules (nft {counts[Backend.NFT]}, "
            f"legacy {counts[Backend.LEGACY]}); following the larger",
        )
    b = Backend.NFT if Backend.NFT in usable else Backend.LEGACY
    return BackendChoice(b, f"no host rules in either backend; defaulting to {b}")


def tool(backend: Backend, family: int, verb: str) -> str:
    """Name of e.g. `ip6tables-nft-restore`."""
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}-{verb}"


def _missing_tools(backend: Backend) -> list[str]:
    return [
        name
        for family in (4, 6)
        for verb in ("save", "restore")
        if shutil.which(name := tool(backend, family, verb)) is None
    ]


def _nft_rule_count() -> int | None:
    count = 0
    for family in (4, 6):
        proc = subprocess.run(
            [tool(Backend.NFT, family, "save")], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            return None
        count += sum(line.startswith("-A ") for line in proc.stdout.splitlines())
    return count


def _legacy_rule_count() -> int | None:
    # python-iptables reads libiptc in-process. Only tables the kernel already
    # lists are opened: opening one would instantiate it, changing the very
    # host we are inspecting.
    try:
        import iptc  # noqa: PLC0415 - loads libxtables; only the probe needs it
    except (ImportError, OSError):
        return None
    count = 0
    for names, table in (("ip_tables_names", iptc.Table), ("ip6_tables_names", iptc.Table6)):
        try:
            # thread-self: /proc/net follows the main thread, not a thread in a pod netns.
            loaded = (Path("/proc/thread-self/net") / names).read_text().split()
        except FileNotFoundError:
            continue
        for name in loaded:
            # python-iptables caches one Table per name for the whole process;
            # refresh re-reads it in the calling thread's netns.
            handle = table(name)
            handle.refresh()
            count += sum(len(chain.rules) for chain in handle.chains)
    return count


def probe_host() -> dict[Backend, int | None]:
    """Rules per backend in the calling thread's netns (None: backend unusable)."""
    return {
        Backend.NFT: None if _missing_tools(Backend.NFT) else _nft_rule_count(),
        Backend.LEGACY: None if _missing_tools(Backend.LEGACY) else _legacy_rule_count(),
    }


def require_tools(backend: Backend) -> None:
    missing = _missing_tools(backend)
    if missing:
        raise NodeSetupError(f"{', '.join(missing)} not found on PATH (install iptables)")
