"""Workload certificates: fetched per local identity, rotated before they expire.

The proxy holds a certificate for each identity that has a pod on this node.
`IdentityManager.acquire` fetches it (the key is made here, only a CSR leaves
the node), then a task renews it at half life. Renewal failures are retried
with backoff until the certificate expires; connections already established
are untouched by a renewal, new handshakes use the new certificate.

While the control plane is away, a pod of an identity held here is served
with the certificate held (that is what lets the node enroll it during an
outage); one of an identity not held cannot be. A renewal that fell due
meanwhile is retried on the control-plane client's reconnect backoff (about
once a second: those attempts fail on the node without reaching anyone), so
it happens within about a second of the CA's return, not at the end of a
long backoff. A CA that answers with a refusal is retried on RETRY_BACKOFF.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from node_agent import openssl
from node_agent.controlplane_access import (
    RECONNECT_BACKOFF,
    REFUSALS_TO_BACK_OFF,
    REFUSED_BACKOFF,
    IssuedCertificate,
)
from node_agent.proxy.controlplane import RpcError
from node_agent.proxy.telemetry import RENEWAL_FAILURES, RENEWALS, ProxyMetrics
from weir_common.errors import TransientError
from weir_common.log_limit import LogLimiter
from weir_common.mesh import SpiffeId

log = logging.getLogger(__name__)

# After a failure other than an unreachable CA (a refusal, a broken provider).
RETRY_BACKOFF: Final = REFUSED_BACKOFF
# After CaUnreachableError: its ceiling bounds how late a renewal comes after an outage.
UNREACHABLE_BACKOFF: Final = RECONNECT_BACKOFF
# One renewal failure line per identity this often; the metric counts every one.
RENEWAL_FAILURE_LOG_INTERVAL_SECONDS: Final = 30.0
# Never renew more often than this, whatever a short-lived certificate asks for.
MIN_RENEW_INTERVAL_SECONDS: Final = 0.5


@dataclass(frozen=True)
class WorkloadCertificate:
    chain_pem: tuple[str, ...]  # leaf first
    private_key_pem: bytes = field(repr=False)
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial: str  # the leaf's, lowercase hex without leading zeros

    @classmethod
    def from_pem(cls, chain_pem: tuple[str, ...], private_key_pem: bytes) -> WorkloadCertificate:
        leaf = openssl.certificate_facts(chain_pem[0])
        return cls(chain_pem, private_key_pem, leaf.not_before, leaf.not_after, leaf.serial)

    def refresh_at(self, received: datetime.datetime) -> datetime.datetime:
        """Half the life left when it arrived (the CA backdates not_before, so not from there)."""
        return received + (self.not_after - received) / 2


class CertificateProvider(Protocol):
    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        """A fresh certificate for `identity`; raises on failure (CaUnreachableError
        when the CA could not be asked at all)."""
        ...


class CaUnreachableError(TransientError):
    """The CA could not be asked (the control plane is away), as opposed to refusing."""


class CertificateSigner(Protocol):
    """What signs CSRs: node_agent.proxy.controlplane.ProxyControlPlaneClient (raising
    RpcError)."""

    async def request_certificate(
        self, spiffe_id: str, validity_seconds: int = 0
    ) -> IssuedCertificate: ...


class CaCertificateProvider:
    """CSRs to the control plane's CA, authenticated as this node by its client."""

    def __init__(self, signer: CertificateSigner, validity_seconds: int = 0) -> None:
        self._signer = signer
        self._validity_seconds = validity_seconds

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        try:
            issued = await self._signer.request_certificate(str(identity), self._validity_seconds)
        except RpcError as e:
            if e.status in REFUSALS_TO_BACK_OFF:
                raise TransientError(f"CA refused {identity}: {e}") from e
            raise CaUnreachableError(f"CA unreachable for {identity}: {e}") from e
        return WorkloadCertificate.from_pem(issued.chain_pem, issued.private_key_pem)


class IdentityManager:
    """Certificates of local identities, each held while some pod uses it."""

    def __init__(
        self,
        provider: CertificateProvider,
        on_rotated: Callable[[SpiffeId], None],
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        *,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self._provider = provider
        self._metrics = metrics
        self._on_rotated = on_rotated
        self._clock = clock
        self._certs: dict[SpiffeId, WorkloadCertificate] = {}
        self._refresh_at: dict[SpiffeId, datetime.datetime] = {}
        self._users: dict[SpiffeId, int] = {}
        self._renewals: dict[SpiffeId, asyncio.Task[None]] = {}
        self._failure_log = LogLimiter(RENEWAL_FAILURE_LOG_INTERVAL_SECONDS)

    def current(self, identity: SpiffeId) -> WorkloadCertificate | None:
        return self._certs.get(identity)

    async def acquire(self, identity: SpiffeId) -> WorkloadCertificate:
        """The certificate for `identity`, fetched unless a valid one is held; pair with
        `release`. Raises (the provider's error) when it has to fetch and cannot."""
        cert = self._valid(identity)
        if cert is None:
            # Held but expired (renewal failed for its whole life): never hand that out.
            expired = identity in self._certs
            fetched = await self._provider.fetch(identity)
            # Another pod of the same identity may have fetched meanwhile; keep the first.
            cert = self._valid(identity) or self._store(identity, fetched)
            if expired:
                self._on_rotated(identity)
        self._users[identity] = self._users.get(identity, 0) + 1
        if identity not in self._renewals:
            self._renewals[identity] = asyncio.create_task(
                self._renew_forever(identity), name=f"renew {identity}"
            )
        return cert

    def _valid(self, identity: SpiffeId) -> WorkloadCertificate | None:
        cert = self._certs.get(identity)
        return cert if cert is not None and cert.not_after > self._clock() else None

    def release(self, identity: SpiffeId) -> None:
        left = self._users.get(identity, 0) - 1
        if left > 0:
            self._users[identity] = left
            return
        self._users.pop(identity, None)
        self._certs.pop(identity, None)
        self._refresh_at.pop(identity, None)
        task = self._renewals.pop(identity, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._renewals.values())
        self._renewals.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def dump(self) -> dict[str, dict[str, str | int]]:
        return {
            str(identity): {
                # As openssl prints it, to match what a peer logged or a CA issued.
                "serial": cert.serial,
                "not_before": cert.not_before.isoformat(),
                "not_after": cert.not_after.isoformat(),
                "refresh_at": self._refresh_at[identity].isoformat(),
                "pods": self._users.get(identity, 0),
            }
            for identity, cert in sorted(self._certs.items(), key=lambda kv: str(kv[0]))
        }

    def _count(self, name: str) -> None:
        # Unlabelled: a label per identity would grow with the node's service accounts.
        if self._metrics is not None:
            self._metrics.inc(name, ())

    def _store(self, identity: SpiffeId, cert: WorkloadCertificate) -> WorkloadCertificate:
        self._certs[identity] = cert
        self._refresh_at[identity] = cert.refresh_at(self._clock())
        return cert

    async def _renew_forever(self, identity: SpiffeId) -> None:
        failures = 0
        # Seconds until the next attempt: None for "when renewal is due".
        retry_in: float | None = None
        while identity in self._certs:
            cert = self._certs[identity]
            if retry_in is None:
                retry_in = (self._refresh_at[identity] - self._clock()).total_seconds()
            await asyncio.sleep(max(retry_in, MIN_RENEW_INTERVAL_SECONDS))
            retry_in = None
            try:
                fresh = await self._provider.fetch(identity)
            except Exception as e:
                self._count(RENEWAL_FAILURES)
                expires_in = (cert.not_after - self._clock()).total_seconds()
                backoff = (
                    UNREACHABLE_BACKOFF if isinstance(e, CaUnreachableError) else RETRY_BACKOFF
                )
                retry_in = backoff.delay(failures)
                self._failure_log.log(
                    log,
                    logging.WARNING,
                    identity,
                    "renewing %s failed (%s); current one expires in %.0f s; retrying",
                    identity,
                    e,
                    expires_in,
                )
                failures += 1
                continue
            if identity not in self._certs:
                return
            self._store(identity, fresh)
            self._count(RENEWALS)
            log.info(
                "rotated certificate of %s, valid until %s%s",
                identity,
                fresh.not_after,
                f" (after {failures} failed attempts)" if failures else "",
            )
            failures = 0
            self._on_rotated(identity)
