"""Where an outbound connection goes: a mesh endpoint (over HBONE) or straight out.

`resolve` is pure: the snapshot and the original destination in, a Route out.
`EndpointPicker` holds the little state load balancing needs (round-robin
position, connections in flight, endpoints that recently failed).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from node_agent.proxy.model import MeshSnapshot, Service, Workload


@dataclass(frozen=True)
class Endpoint:
    workload: Workload
    address: str
    port: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


@dataclass(frozen=True)
class MeshRoute:
    """To workloads of the mesh: a service's endpoints, or one pod dialed by IP."""

    service: Service | None
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class Passthrough:
    """Outside the mesh (or a service port it does not know): plain TCP as dialed."""

    address: str
    port: int


Route = MeshRoute | Passthrough


def resolve(snapshot: MeshSnapshot, address: str, port: int) -> Route:
    version = 6 if ":" in address else 4  # addresses here are canonical already
    service = snapshot.service_by_vip(address)
    if service is not None:
        target_port = service.target_port(port)
        if target_port is None:
            return Passthrough(address, port)
        endpoints = []
        for key in service.endpoints:
            workload = snapshot.workloads.get(key)
            ip = workload.ip_of_family(version) if workload is not None else None
            if workload is not None and ip is not None:
                endpoints.append(Endpoint(workload, ip, target_port))
        return MeshRoute(service, tuple(endpoints))
    workload = snapshot.workload_by_ip(address)
    if workload is not None:
        return MeshRoute(None, (Endpoint(workload, address, port),))
    return Passthrough(address, port)


class RouteCache:
    """`resolve`'s answers for the current snapshot, kept until the snapshot changes.

    Resolving took a few Python calls (address canonicalization, a service's
    port map, new Endpoint objects) on every outbound connection, for an
    answer that only a new snapshot changes. At most `limit` destinations are
    kept (pass-through ones are anyone's to choose); a full cache starts over.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._snapshot: MeshSnapshot | None = None
        self._routes: dict[tuple[str, int], Route] = {}

    def resolve(self, snapshot: MeshSnapshot, address: str, port: int) -> Route:
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._routes = {}
        key = (address, port)
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) >= self._limit:
                self._routes = {}
            route = self._routes[key] = resolve(snapshot, address, port)
        return route


class Balancing(enum.Enum):
    ROUND_ROBIN = "round-robin"
    LEAST_REQUEST = "least-request"


class EndpointPicker:
    """Orders a route's endpoints for trying, healthiest and least loaded first.

    An endpoint that failed to connect sits out for `eject_seconds`; if every
    endpoint is out, they are still tried (last), since refusing outright
    would be worse than a retry that may succeed.
    """

    def __init__(
        self,
        balancing: Balancing = Balancing.ROUND_ROBIN,
        *,
        eject_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.balancing = balancing
        self._eject_seconds = eject_seconds
        self._clock = clock
        self._next = 0
        self._active: dict[tuple[str, int], int] = {}
        self._ejected_until: dict[tuple[str, int], float] = {}

    def order(self, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        if len(endpoints) < 2:
            return list(endpoints)  # nothing to order: a pod dialed by IP, a one-pod service
        start = self._next % len(endpoints)
        self._next += 1
        rotated = [*endpoints[start:], *endpoints[:start]]
        if self.balancing is Balancing.LEAST_REQUEST:
            # Stable sort: ties keep the round-robin order, so equal load still spreads.
            rotated.sort(key=lambda e: self._active.get(e.key, 0))
        now = self._clock()
        healthy = [e for e in rotated if self._ejected_until.get(e.key, 0.0) <= now]
        ejected = [e for e in rotated if self._ejected_until.get(e.key, 0.0) > now]
        return healthy + ejected

    def started(self, endpoint: Endpoint) -> None:
        self._active[endpoint.key] = self._active.get(endpoint.key, 0) + 1
        self._ejected_until.pop(endpoint.key, None)

    def finished(self, endpoint: Endpoint) -> None:
        left = self._active.get(endpoint.key, 0) - 1
        if left > 0:
            self._active[endpoint.key] = left
        else:
            self._active.pop(endpoint.key, None)

    def failed(self, endpoint: Endpoint) -> None:
        self._ejected_until[endpoint.key] = self._clock() + self._eject_seconds
