"""What the data path reads and `Proxy` writes: served pods, the mesh config, TLS contexts.

Inbound and outbound only read these; config pushes, certificate rotation
and pod changes replace them whole, so a connection in flight keeps what it
already took.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from node_agent.netns import Netns
from node_agent.proxy import tls as tls_mod
from node_agent.proxy.hbone import H2Protocol
from node_agent.proxy.identity import WorkloadCertificate
from node_agent.proxy.model import MeshSnapshot, Workload
from weir_common.errors import TransientError
from weir_common.mesh import SpiffeId


class Listener(Protocol):
    def close(self) -> None:
        """Stop accepting; connections already accepted go on."""
        ...


@dataclass(eq=False)
class PodState:
    """A pod the proxy serves: where its listeners live and who it is in the mesh."""

    netns: Netns
    workload: Workload
    identity: SpiffeId
    servers: list[Listener] = field(default_factory=list)
    tunnels: set[H2Protocol] = field(default_factory=set)

    @property
    def uid(self) -> str:
        return self.workload.uid

    @functools.cached_property
    def addresses(self) -> frozenset[str]:
        """The pod's IPs in canonical form: the only CONNECT targets its 15008 takes."""
        return frozenset(str(ipaddress.ip_address(ip)) for ip in self.workload.ips)


class MeshView:
    """The mesh snapshot in force, looked up once per connection."""

    def __init__(self) -> None:
        self._snapshot: MeshSnapshot | None = None

    @property
    def snapshot(self) -> MeshSnapshot:
        if self._snapshot is None:
            raise TransientError("the proxy has no mesh config yet")
        return self._snapshot

    def replace(self, snapshot: MeshSnapshot) -> MeshSnapshot | None:
        """Put `snapshot` in force; returns the one it replaces."""
        old, self._snapshot = self._snapshot, snapshot
        return old

    def dump(self) -> dict[str, Any] | None:
        return self._snapshot.dump() if self._snapshot is not None else None


@dataclass(frozen=True)
class TlsContext:
    context: ssl.SSLContext
    generation: int  # bumped on rotation or trust bundle change; part of the pool key


class TlsContexts:
    """Per local identity, the contexts new handshakes use: server for 15008, client for dials."""

    def __init__(self) -> None:
        self._generation = 0
        self._server: dict[SpiffeId, TlsContext] = {}
        self._client: dict[SpiffeId, TlsContext] = {}

    def server(self, identity: SpiffeId) -> TlsContext:
        return self._server[identity]

    def client(self, identity: SpiffeId) -> TlsContext:
        return self._client[identity]

    def __contains__(self, identity: SpiffeId) -> bool:
        return identity in self._server

    def install(
        self, identity: SpiffeId, cert: WorkloadCertificate, trust_bundle: Sequence[str]
    ) -> int:
        """New contexts for `identity` under a fresh generation, which is returned."""
        self._generation += 1
        gen = self._generation
        self._server[identity] = TlsContext(tls_mod.server_context(cert, trust_bundle), gen)
        self._client[identity] = TlsContext(tls_mod.client_context(cert, trust_bundle), gen)
        return gen

    def discard(self, identity: SpiffeId) -> None:
        self._server.pop(identity, None)
        self._client.pop(identity, None)
