"""Fakes that plug into `proxy.build()` for tests, the benchmark and local runs.

- StaticConfigSource: a snapshot you set by hand, pushed like the xDS client would.
- SnapshotConsumer: takes snapshots as the proxy does, refusing one on request.
- self_signed_root_pem: a throwaway CA root, for trust bundles.
- LocalCaCertificates: certificates signed in-process by the control plane's own
  CertificateAuthority (real X.509 SVIDs, no gRPC).
- AccessLogRecorder: keeps access log entries as dicts.
- LoopThread: an event loop in a thread, so blocking test code can drive proxies.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import uvloop

from node_agent import openssl
from node_agent.proxy.identity import WorkloadCertificate
from node_agent.proxy.model import MeshSnapshot
from node_agent.proxy.telemetry import AccessLog
from weir_common.mesh import SpiffeId

# The cryptography package (which controlplane.ca loads) stays out of this
# module's imports: the benchmark's proxy child uses StaticConfigSource, and
# its memory figure is a node proxy's, which does not load that package.
if TYPE_CHECKING:
    from controlplane.ca import CertificateAuthority

T = TypeVar("T")


class StaticConfigSource:
    """Pushes the snapshot given, then every one passed to `set`."""

    def __init__(self, snapshot: MeshSnapshot) -> None:
        self._snapshot = snapshot
        self._changed = asyncio.Event()

    def set(self, snapshot: MeshSnapshot) -> None:
        self._snapshot = snapshot
        self._changed.set()

    async def run(self, apply: Callable[[MeshSnapshot], None]) -> None:
        while True:
            self._changed.clear()
            apply(self._snapshot)
            await self._changed.wait()


class SnapshotConsumer:
    """Takes a snapshot in, then may fail on it, as the proxy can (it swaps the
    snapshot in first and rebuilds TLS contexts from it after)."""

    def __init__(self) -> None:
        self.in_force: MeshSnapshot | None = None
        self.refuse: str | None = None

    def __call__(self, snapshot: MeshSnapshot) -> None:
        self.in_force = snapshot
        if self.refuse is not None and self.refuse in snapshot.workloads:
            raise RuntimeError(f"cannot serve {self.refuse}")


def self_signed_root_pem() -> str:
    from cryptography import x509  # noqa: PLC0415 - see the note at the imports
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_csr(identity: SpiffeId) -> tuple[str, bytes]:
    """(CSR PEM, private key PEM) for `identity`, made as the node makes them."""
    key_pem, csr_pem = openssl.new_key_and_csr(str(identity))
    return csr_pem, key_pem


class LocalCaCertificates:
    """A CertificateProvider signing with an in-process CertificateAuthority."""

    def __init__(self, ca: CertificateAuthority, ttl: datetime.timedelta | None = None) -> None:
        self.ca = ca
        self.ttl = ttl
        self.issued: list[SpiffeId] = []
        self.fail_next = 0  # how many upcoming fetches fail (renewal-failure tests)

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError("CA unavailable (test)")
        return self.issue(identity)

    def issue(self, identity: SpiffeId) -> WorkloadCertificate:
        csr, key_pem = make_csr(identity)
        chain = self.ca.sign(csr, identity, ttl=self.ttl, now=datetime.datetime.now(datetime.UTC))
        self.issued.append(identity)
        return WorkloadCertificate.from_pem(tuple(chain), key_pem)


class AccessLogRecorder(AccessLog):
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        super().__init__(lambda line: self.entries.append(json.loads(line)))


class LoopThread:
    """A uvloop event loop running in a daemon thread until `close()`."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
