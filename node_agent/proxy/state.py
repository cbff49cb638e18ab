"""What the data path reads and `Proxy` writes: served pods, the mesh config, TLS contexts.

Inbound and outbound only read these; config pushes, certificate rotation
and pod changes replace them whole, so a connection in flight keeps what it
already took.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class _TlsMaterial:
    cert: WorkloadCertificate
    trust_bundle: tuple[str, ...]
    generation: int


class TlsContexts:
    """Per local identity, the contexts new handshakes use: server for 15008, client for dials.

    A context is built on its first use, not at install: each holds about
    26 KiB of OpenSSL's memory, and most identities on a node only ever
    accept or only ever dial (or, idle, neither), so a proxy with 100
    identities would otherwise hold 5 MiB of contexts it never uses. Install
    still builds one to check the certificate, key and trust bundle, so bad
    material is refused there and changes nothing; a first use then costs a
    build (about 2.4 ms on a 2-core VM), once per identity, direction and
    rotation.
    """

    def __init__(self) -> None:
        self._generation = 0
        self._material: dict[SpiffeId, _TlsMaterial] = {}
        self._server: dict[SpiffeId, TlsContext] = {}
        self._client: dict[SpiffeId, TlsContext] = {}

    def server(self, identity: SpiffeId) -> TlsContext:
        return self._built(self._server, identity, tls_mod.server_context)

    def client(self, identity: SpiffeId) -> TlsContext:
        return self._built(self._client, identity, tls_mod.client_context)

    def _built(
        self,
        held: dict[SpiffeId, TlsContext],
        identity: SpiffeId,
        build: Callable[[WorkloadCertificate, Sequence[str]], ssl.SSLContext],
    ) -> TlsContext:
        context = held.get(identity)
        if context is None:
            material = self._material[identity]
            context = TlsContext(build(material.cert, material.trust_bundle), material.generation)
            held[identity] = context
        return context

    def __contains__(self, identity: SpiffeId) -> bool:
        return identity in self._material

    def install(
        self, identity: SpiffeId, cert: WorkloadCertificate, trust_bundle: Sequence[str]
    ) -> int:
        """Contexts for `identity` under a fresh generation, which is returned.

        Raises, changing nothing, if a context cannot be built from them."""
        tls_mod.server_context(cert, trust_bundle)  # the check; dropped at once
        self._generation += 1
        self._material[identity] = _TlsMaterial(cert, tuple(trust_bundle), self._generation)
        self._server.pop(identity, None)
        self._client.pop(identity, None)
        return self._generation

    def discard(self, identity: SpiffeId) -> None:
        self._material.pop(identity, None)
        self._server.pop(identity, None)
        self._client.pop(identity, None)
