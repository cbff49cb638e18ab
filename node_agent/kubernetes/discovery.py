"""Finding a running pod's sandbox as the CNI ADD would have named it: sandbox id and netns.

Pods that started before the agent (or while it was down) never had their
ADD seen. They are found through /proc (the agent runs with hostPID): each
container's processes sit in a cgroup whose path names the pod's UID and the
container's id, with either kubelet cgroup driver:

    cgroupfs: .../kubepods/<qos>/pod<uid>/<container id>
    systemd:  .../kubepods-<qos>-pod<uid, '-' as '_'>.slice/cri-containerd-<container id>.scope

(no <qos> level for Guaranteed pods). The app containers' ids are listed in
the pod's status; the one container of the pod that is not listed there is
the sandbox (the pause process), and its netns is the pod's. The runtime
gave the CNI a named netns path (/var/run/netns/cni-...); the one with the
same inode is preferred so the registry records what the CNI would have.

Everything here except HostProc and named_netns is pure, so it is tested
with fixtures; HostProc reads the real /proc.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

NETNS_DIR: Final = Path("/var/run/netns")
# The pod UID and container id at the end of a kubepods cgroup path.
_POD_CGROUP: Final = re.compile(
    r"pod(?P<uid>[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
    r"(?:\.slice)?/"
    r"(?:(?:cri-containerd|crio|docker)-)?(?P<cid>[0-9a-f]{64})(?:\.scope)?$"
)
# How a container id is written in status.containerStatuses[].containerID.
_RUNTIME_ID: Final = re.compile(r"^[a-z0-9.-]+://(?P<cid>[0-9a-f]{64})$")


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    cgroup: str  # /proc/<pid>/cgroup as read
    netns_inode: int


class ProcReader(Protocol):
    def processes(self) -> Iterator[ProcessInfo]:
        """Every process still there when looked at (those that exit meanwhile are skipped)."""
        ...

    def named_netns(self) -> Mapping[int, str]:
        """Netns inode -> its path under /var/run/netns."""
        ...


@dataclass(frozen=True)
class Sandbox:
    container_id: str
    netns: str
    pid: int


def pod_container(cgroup: str) -> tuple[str, str] | None:
    """(pod uid, container id) named by a /proc/<pid>/cgroup text, or None for other processes."""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        if "kubepods" not in path:
            continue
        found = _POD_CGROUP.search(path)
        if found is not None:
            return found["uid"].replace("_", "-"), found["cid"]
    return None


PodProcesses = dict[str, dict[str, list[ProcessInfo]]]


def index_processes(processes: Iterable[ProcessInfo]) -> PodProcesses:
    """Pod uid -> container id -> its processes, from one scan of /proc."""
    index: PodProcesses = {}
    for process in processes:
        named = pod_container(process.cgroup)
        if named is not None:
            uid, cid = named
            index.setdefault(uid, {}).setdefault(cid, []).append(process)
    return index


def app_container_ids(pod: Mapping[str, Any]) -> frozenset[str]:
    """Ids of the pod's app, init and ephemeral containers, as its status lists them."""
    status = pod.get("status") or {}
    ids: set[str] = set()
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for entry in status.get(key) or ():
            found = _RUNTIME_ID.match(str((entry or {}).get("containerID") or ""))
            if found is not None:
                ids.add(found["cid"])
    return frozenset(ids)


def find_sandbox(
    pod: Mapping[str, Any], index: PodProcesses, named_netns: Mapping[int, str]
) -> Sandbox | str:
    """The pod's sandbox, or why it cannot be told for sure (then the pod is not touched)."""
    uid = str((pod.get("metadata") or {}).get("uid") or "")
    containers = index.get(uid)
    if not containers:
        return f"no process of pod uid {uid} found in /proc"
    apps = app_container_ids(pod)
    candidates = sorted(cid for cid in containers if cid not in apps)
    if not candidates:
        return "no sandbox process found (every container process is an app container's)"
    if len(candidates) > 1:
        # An app container the status does not list yet: wait for the status, never guess.
        return f"{len(candidates)} containers not in the pod's status; cannot tell the sandbox"
    sandbox_id = candidates[0]
    inodes = {p.netns_inode for p in containers[sandbox_id]}
    if len(inodes) != 1:
        return f"the sandbox {sandbox_id[:12]} has processes in {len(inodes)} network namespaces"
    inode = inodes.pop()
    pid = min(p.pid for p in containers[sandbox_id])
    netns = named_netns.get(inode, f"/proc/{pid}/ns/net")
    return Sandbox(container_id=sandbox_id, netns=netns, pid=pid)


class HostProc:
    """The real /proc and /var/run/netns (a hostPID agent sees every pod's processes)."""

    def __init__(self, proc: Path = Path("/proc"), netns_dir: Path = NETNS_DIR) -> None:
        self._proc = proc
        self._netns_dir = netns_dir

    def processes(self) -> Iterator[ProcessInfo]:
        for entry in self._proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cgroup = (entry / "cgroup").read_text()
                if "kubepods" not in cgroup:
                    continue
                inode = (entry / "ns" / "net").stat().st_ino
            except OSError:
                continue  # exited meanwhile, or a kernel thread
            yield ProcessInfo(int(entry.name), cgroup, inode)

    def named_netns(self) -> Mapping[int, str]:
        found: dict[int, str] = {}
        try:
            paths = sorted(self._netns_dir.iterdir())
        except FileNotFoundError:
            return found
        for path in paths:
            try:
                found.setdefault(path.stat().st_ino, str(path))
            except OSError:
                continue
        return found
