"""Where the eBPF mode keeps its state: pins under one root on bpffs.

```
<root>/maps/<map name>             every map (per-pod config, listeners, connections)
<root>/progs/weir_sk_lookup        the inbound program, linked into each pod netns
<root>/links/<program name>        node-wide links at the cgroup v2 root
<root>/pods/sk_lookup-<cookie>     one link per captured pod netns
```

A pinned link keeps its program attached with no process holding it, so an
agent restart detaches nothing; a new agent re-opens the pins. Removing a
pin (and closing any fd) is what detaches and frees. The default root is
/sys/fs/bpf/weir; tests use their own root beside it.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from weir_common.errors import NodeSetupError

log = logging.getLogger(__name__)

BPFFS: Final = Path("/sys/fs/bpf")
DEFAULT_PIN_ROOT: Final = BPFFS / "weir"
_POD_LINK_PREFIX: Final = "sk_lookup-"


@dataclass(frozen=True)
class PinLayout:
    root: Path = DEFAULT_PIN_ROOT

    def map(self, name: str) -> Path:
        return self.root / "maps" / name

    def prog(self, name: str) -> Path:
        return self.root / "progs" / name

    def link(self, name: str) -> Path:
        return self.root / "links" / name

    @property
    def pods_dir(self) -> Path:
        return self.root / "pods"

    def pod_link(self, netns_cookie: int) -> Path:
        return self.pods_dir / f"{_POD_LINK_PREFIX}{netns_cookie}"

    def pod_links(self) -> dict[int, Path]:
        """Pod link pins by netns cookie."""
        if not self.pods_dir.is_dir():
            return {}
        return {
            int(p.name.removeprefix(_POD_LINK_PREFIX)): p
            for p in self.pods_dir.iterdir()
            if p.name.startswith(_POD_LINK_PREFIX)
        }

    def all_pins(self) -> list[Path]:
        """Every pinned object under the root, deepest first (the removal order)."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.rglob("*") if not p.is_dir()), reverse=True)


@dataclass(frozen=True)
class Mount:
    mount_point: Path
    root: str  # the part of the filesystem mounted there ("/" unless a bind or cgroupns)
    fstype: str


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/self/mountinfo as (mount point, root, fstype), in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        sep = fields.index("-")
        mounts.append(Mount(Path(_unescape(fields[4])), _unescape(fields[3]), fields[sep + 1]))
    return mounts


def cgroup2_mount(mounts: Sequence[Mount]) -> Mount:
    """Where the cgroup v2 hierarchy is mounted (the first mount of it)."""
    for m in mounts:
        if m.fstype == "cgroup2":
            return m
    raise NodeSetupError(
        "no cgroup v2 hierarchy is mounted (the eBPF mode attaches at its root): boot with "
        "systemd.unified_cgroup_hierarchy=1, or mount one "
        "(mount -t cgroup2 none /sys/fs/cgroup/unified)"
    )


def mount_of(path: Path, mounts: Sequence[Mount]) -> Mount | None:
    """The mount `path` lives on: the last-mounted one with the longest matching mount point."""
    best: Mount | None = None
    for m in mounts:
        inside = path == m.mount_point or m.mount_point in path.parents
        if inside and (best is None or len(m.mount_point.parts) >= len(best.mount_point.parts)):
            best = m
    return best


def read_mounts() -> list[Mount]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def cgroup2_root() -> Path:
    mount = cgroup2_mount(read_mounts())
    if mount.root != "/":
        # Inside a cgroup namespace or a bind mount we would attach to a subtree
        # and silently miss every process outside it.
        raise NodeSetupError(
            f"cgroup v2 at {mount.mount_point} shows only the subtree {mount.root}: run the agent "
            "in the host's cgroup namespace so programs attach at the real root"
        )
    return mount.mount_point


def ensure_bpffs(root: Path) -> str | None:
    """Make sure `root` can hold pins; mount bpffs at /sys/fs/bpf if nothing is there.

    Returns what was done (for the report), or None if bpffs was already in place.
    """
    mount = mount_of(root, read_mounts())
    if mount is not None and mount.fstype == "bpf":
        return None
    if BPFFS not in root.parents:
        raise NodeSetupError(f"pin root {root} is not on a bpf filesystem")
    proc = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NodeSetupError(f"cannot mount bpffs at {BPFFS}: {proc.stderr.strip()}")
    log.warning("mounted bpffs at %s (it was not mounted)", BPFFS)
    return f"mounted bpffs at {BPFFS}"
