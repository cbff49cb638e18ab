"""The agent's memory of enrolled pods, kept on disk across restarts.

Written atomically (temp file, fsync, rename) after every change, so a kill -9
at any point leaves either the old or the new registry, never half of one.
The file lives on the node (not tmpfs): after an agent restart it says which
pods to re-check; after a reboot every recorded netns is gone and the records
are dropped by reconcile, while the runtime re-runs CNI ADD for new sandboxes.
Each record carries the boot it was written in, since the netns inode and
cookie it names are reused by the kernel after a reboot.

A pod is recorded twice during its ADD: first as `enrolled=False`, before any
step touches the node, then as `enrolled=True` once every step is done. A
record still `enrolled=False` when an agent starts is an ADD whose agent died
half-way (the plugin reported a retryable error): the new agent undoes what
that ADD may have applied, so no pod stays captured without a proxy.

Changes are serialised: the CNI server runs requests on several threads, and
each change rewrites the whole file from the in-memory state.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from node_agent.redirect.config import CaptureConfig, parse_cidrs
from weir_common.atomic_file import TEMP_SUFFIX, write_atomically
from weir_common.errors import InvalidInputError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PodRecord:
    uid: str
    namespace: str
    name: str
    service_account: str
    container_id: str
    netns: str
    # Identity of the namespace at enrollment: a reused path is not our pod.
    netns_inode: int
    ips: tuple[str, ...]
    capture: CaptureConfig
    mode: str
    # False from the start of the pod's ADD until its last step succeeded.
    enrolled: bool = True
    # The netns's kernel cookie (eBPF state is keyed by it; 0: not known) and the
    # boot both numbers belong to (empty: not known): after a reboot they name
    # nothing of this pod, and may name another's (enrollment/reconcile.py).
    netns_cookie: int = 0
    boot_id: str = ""

    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["capture"] = {
            "exclude_outbound_ports": list(self.capture.exclude_outbound_ports),
            "exclude_inbound_ports": list(self.capture.exclude_inbound_ports),
            "include_inbound_ports": list(self.capture.include_inbound_ports),
            "exclude_outbound_cidrs": [str(n) for n in self.capture.exclude_outbound_cidrs],
        }
        data["ips"] = list(self.ips)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PodRecord:
        capture = data["capture"]
        return cls(
            uid=str(data["uid"]),
            namespace=str(data["namespace"]),
            name=str(data["name"]),
            service_account=str(data["service_account"]),
            container_id=str(data["container_id"]),
            netns=str(data["netns"]),
            netns_inode=int(data["netns_inode"]),
            ips=tuple(str(ip) for ip in data["ips"]),
            capture=CaptureConfig(
                exclude_outbound_ports=tuple(capture["exclude_outbound_ports"]),
                exclude_inbound_ports=tuple(capture["exclude_inbound_ports"]),
                include_inbound_ports=tuple(capture["include_inbound_ports"]),
                exclude_outbound_cidrs=parse_cidrs(capture["exclude_outbound_cidrs"], "registry"),
            ),
            mode=str(data["mode"]),
            # Written by agents that recorded only finished enrollments.
            enrolled=bool(data.get("enrolled", True)),
            # Written by agents that did not record them.
            netns_cookie=int(data.get("netns_cookie", 0)),
            boot_id=str(data.get("boot_id", "")),
        )


class PodRegistry:
    """Enrolled pods by uid, mirrored to `path` on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pods: dict[str, PodRecord] = {}
        # Held from reading the current pods to publishing the new ones, so two
        # concurrent changes cannot each write a file that lacks the other's pod.
        self._write_lock = threading.Lock()

    def load(self) -> None:
        """Read the file if there is one; a corrupt file is an error, never silently empty."""
        # An agent killed mid-write leaves its temporary file; the rename never happened,
        # so the registry is the file as it was and the temporary one is garbage.
        for stale in self.path.parent.glob(f".{self.path.name}.*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            self._pods = {}
            return
        try:
            pods = _parse(text)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidInputError(f"pod registry {self.path} is unreadable: {e!r}") from None
        self._pods = {p.uid: p for p in pods}

    def __iter__(self) -> Iterator[PodRecord]:
        return iter(sorted(self._pods.values(), key=PodRecord.key))

    def __len__(self) -> int:
        return len(self._pods)

    def by_container(self, container_id: str) -> PodRecord | None:
        """The record of a sandbox, by the id the runtime gives it in CNI calls."""
        return next((r for r in self._pods.values() if r.container_id == container_id), None)

    def get(self, uid: str) -> PodRecord | None:
        return self._pods.get(uid)

    def put(self, record: PodRecord) -> None:
        with self._write_lock:
            self._save({**self._pods, record.uid: record})

    def remove(self, uid: str) -> None:
        with self._write_lock:
            if uid in self._pods:
                self._save({k: v for k, v in self._pods.items() if k != uid})

    def _save(self, pods: dict[str, PodRecord]) -> None:
        # Memory changes only after the file did: a failed write leaves both as they were.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = {
            "version": FORMAT_VERSION,
            "pods": [p.to_json() for p in sorted(pods.values(), key=PodRecord.key)],
        }
        write_atomically(self.path, json.dumps(body, indent=1, sort_keys=True).encode())
        self._pods = pods


def _parse(text: str) -> list[PodRecord]:
    data = json.loads(text)
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {data.get('version')!r}, expected {FORMAT_VERSION}")
    return [PodRecord.from_json(p) for p in data["pods"]]
