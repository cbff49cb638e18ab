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
import os
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
NO_NODE_BPFFS: Final = (
    f"no bpffs at {BPFFS} in the agent's pod: mount the node's bpffs there (a hostPath of "
    f"the node's {BPFFS}, deploy/components/bpffs) and make sure the node has one "
    f"(mount -t bpf bpf {BPFFS}; systemd does at boot). Weir does not mount one in the pod: "
    "it would vanish with the pod, and capture with it"
)


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


CGROUP2_ROOT_ENV: Final = "WEIR_CGROUP2_ROOT"
# Kernfs numbers a hierarchy's root directory 1, and a cgroup directory's inode
# is its cgroup ID: inode 1 is the root cgroup whatever path or namespace shows it.
_ROOT_CGROUP_INODE: Final = 1
_CGROUP2_SUPER_MAGIC: Final = 0x63677270


def _statfs_type(path: Path) -> int:
    # os has no statfs; stat -f asks the kernel for the filesystem's magic number.
    proc = subprocess.run(
        ["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NodeSetupError(f"cannot stat the filesystem at {path}: {proc.stderr.strip()}")
    return int(proc.stdout.strip(), 16)


def require_root_cgroup(path: Path) -> Path:
    """`path` itself if it is the root cgroup of the cgroup v2 hierarchy; NodeSetupError if not."""
    try:
        inode = path.stat().st_ino
    except OSError as e:
        raise NodeSetupError(f"cgroup v2 root {path}: {e.strerror}") from None
    if _statfs_type(path) != _CGROUP2_SUPER_MAGIC:
        raise NodeSetupError(
            f"{path} is not a cgroup v2 filesystem: point ${CGROUP2_ROOT_ENV} (agent: "
            "--cgroup2-root) at the node's cgroup2 mount (a hybrid host has it at "
            "/sys/fs/cgroup/unified; findmnt -t cgroup2 on the node shows it)"
        )
    if inode != _ROOT_CGROUP_INODE:
        # Inside a cgroup namespace, or through a bind of a subdirectory, we would
        # attach to a subtree and silently miss every process outside it.
        raise NodeSetupError(
            f"{path} is a cgroup below the root of the cgroup v2 hierarchy, not its root: "
            "mount the node's cgroup2 mount point itself (in Kubernetes a hostPath of it, "
            f"named by ${CGROUP2_ROOT_ENV}) so programs attach at the real root"
        )
    return path


def cgroup2_root() -> Path:
    """The node's root cgroup: ${CGROUP2_ROOT_ENV} when set, else the first cgroup2 mount."""
    configured = os.environ.get(CGROUP2_ROOT_ENV)
    if configured:
        return require_root_cgroup(Path(configured))
    return require_root_cgroup(cgroup2_mount(read_mounts()).mount_point)


def in_kubernetes_pod() -> bool:
    # The kubelet sets it in every container, host-network ones included.
    return "KUBERNETES_SERVICE_HOST" in os.environ


def ensure_bpffs(root: Path) -> str | None:
    """Make sure `root` can hold pins; mount bpffs at /sys/fs/bpf if nothing is there.

    Returns what was done (for the report), or None if bpffs was already in place.
    """
    mount = mount_of(root, read_mounts())
    if mount is not None and mount.fstype == "bpf":
        return None
    if BPFFS not in root.parents:
        raise NodeSetupError(f"pin root {root} is not on a bpf filesystem")
    if in_kubernetes_pod():
        # A bpffs mounted here would be the pod's own and vanish with it, taking
        # capture along: the pins must land in the node's.
        raise NodeSetupError(NO_NODE_BPFFS)
    proc = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NodeSetupError(f"cannot mount bpffs at {BPFFS}: {proc.stderr.strip()}")
    log.warning("mounted bpffs at %s (it was not mounted)", BPFFS)
    return f"mounted bpffs at {BPFFS}"
