"""Where every config change lands: source config + registrations -> snapshot.

Runs on the event loop; each change rebuilds the snapshot (reusing unchanged
entries) and hands it to `publish`. Validation happens before anything is
stored, so a refused change leaves the state as it was.
"""

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import grpc

from controlplane.auth import RequestRefusedError, authorize_registration, invalid_argument
from controlplane.mesh import MeshConfig
from controlplane.snapshot import EMPTY, Registration, Snapshot, build_snapshot

log = logging.getLogger(__name__)

MAX_UID_LENGTH: Final = 128
MAX_IPS_PER_WORKLOAD: Final = 8


class MeshState:
    def __init__(
        self,
        mesh: MeshConfig,
        trust_bundle_pem: Iterable[str],
        publish: Callable[[Snapshot], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mesh = mesh
        self._trust_bundle = tuple(trust_bundle_pem)
        self._registrations: dict[str, Registration] = {}
        self._publish = publish
        self._clock = clock
        self._snapshot = EMPTY
        self._rebuild()

    @property
    def mesh(self) -> MeshConfig:
        return self._mesh

    @property
    def registrations(self) -> Mapping[str, Registration]:
        return self._registrations

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def set_mesh(self, mesh: MeshConfig) -> None:
        """A source produced a new valid config."""
        self._mesh = mesh
        for name, registration in list(self._registrations.items()):
            workload = mesh.workloads.get(name)
            if workload is None or workload.node != registration.node:
                log.info("dropping registration of %s: not declared on its node any more", name)
                del self._registrations[name]
            elif mesh.status_from_source and workload.uid not in ("", registration.uid):
                log.info("dropping registration of %s: the pod was replaced (new uid)", name)
                del self._registrations[name]
        self._rebuild()

    def register(self, node: str, namespace: str, name: str, uid: str, ips: Iterable[str]) -> None:
        registration = Registration(node, uid, _canonical_ips(ips))
        if len(uid) > MAX_UID_LENGTH:
            raise invalid_argument("bad_registration", f"uid longer than {MAX_UID_LENGTH}")
        key = f"{namespace}/{name}"
        authorize_registration(self._mesh, self._registrations, node, key, registration)
        if self._registrations.get(key) != registration:
            self._registrations[key] = registration
            self._rebuild()

    def deregister(self, node: str, namespace: str, name: str, uid: str) -> None:
        key = f"{namespace}/{name}"
        current = self._registrations.get(key)
        if current is None:
            return  # already gone: removal is idempotent
        if current.node != node:
            raise RequestRefusedError(
                grpc.StatusCode.PERMISSION_DENIED,
                "not_on_node",
                f"{key} was registered by node {current.node!r}, not {node!r}",
            )
        if current.uid != uid:
            raise RequestRefusedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "uid_mismatch",
                f"{key} is registered with uid {current.uid!r}, not {uid!r}",
            )
        del self._registrations[key]
        self._rebuild()

    def dump(self) -> dict[str, Any]:
        return {
            "mesh": self._mesh.dump(),
            "registrations": {k: r.dump() for k, r in sorted(self._registrations.items())},
            "snapshot": self._snapshot.dump(),
        }

    def _rebuild(self) -> None:
        self._snapshot = build_snapshot(
            self._mesh,
            self._registrations,
            self._trust_bundle,
            previous=self._snapshot,
            now=self._clock(),
        )
        self._publish(self._snapshot)


def _canonical_ips(ips: Iterable[str]) -> tuple[str, ...]:
    result = []
    for text in ips:
        try:
            result.append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise invalid_argument("bad_registration", f"{text!r} is not an IP address") from None
    if len(result) > MAX_IPS_PER_WORKLOAD:
        raise invalid_argument("bad_registration", f"more than {MAX_IPS_PER_WORKLOAD} IPs")
    if len(set(result)) != len(result):
        raise invalid_argument("bad_registration", "duplicate IP")
    return tuple(result)
