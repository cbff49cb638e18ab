"""Removing what local meshes left behind: every name they create starts with a prefix."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Final

from node_agent.localmesh.wiring import NETNS_DIR, delete_host_link, delete_netns
from weir_common.errors import InvalidInputError, WeirError

# Every topology's prefix starts with this; sweep() refuses anything else, so a
# typo can never delete the host's own links.
PREFIX_ROOT: Final = "wlm"


class CleanupError(WeirError):
    """Something of ours could not be removed; `sweep(prefix)` may be retried."""

    retryable = True


def sweep(prefix: str = PREFIX_ROOT) -> list[str]:
    """Remove every netns, host link and temp directory whose name starts with `prefix`.

    With a topology's own prefix this cleans up after that topology's crashed
    run; with PREFIX_ROOT it removes every topology's leftovers, including
    those of a topology still running, so only do that when none is. Returns
    what was removed; raises CleanupError listing what could not be.
    """
    if not prefix.startswith(PREFIX_ROOT):
        raise InvalidInputError(f"sweep prefix {prefix!r} does not start with {PREFIX_ROOT!r}")
    removed: list[str] = []
    failures: list[str] = []
    names = sorted(p.name for p in NETNS_DIR.glob(f"{prefix}*")) if NETNS_DIR.is_dir() else []
    for name in names:
        try:
            delete_netns(name)
            removed.append(f"netns {name}")
        except WeirError as e:
            failures.append(e.message)
    # We never create links in the host; one showing up here means a bug put
    # it there, and it must not outlive the run.
    for ifname in sorted(Path("/sys/class/net").iterdir()):
        if ifname.name.startswith(prefix):
            try:
                delete_host_link(ifname.name)
                removed.append(f"host link {ifname.name}")
            except WeirError as e:
                failures.append(e.message)
    for directory in sorted(Path(tempfile.gettempdir()).glob(f"{prefix}*")):
        try:
            shutil.rmtree(directory)
            removed.append(f"directory {directory}")
        except OSError as e:
            failures.append(f"rm -r {directory}: {e.strerror}")
    if failures:
        raise CleanupError("could not remove: " + "; ".join(failures))
    return removed
