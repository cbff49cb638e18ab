"""Workload certificates through a control-plane outage: held ones serve, due ones renew."""

from __future__ import annotations

import asyncio
import datetime
import time

import pytest
import uvloop

from controlplane.ca import CertificateAuthority, load_or_create_root
from node_agent.controlplane_access import IssuedCertificate, Status
from node_agent.proxy.controlplane import RpcError
from node_agent.proxy.identity import (
    CaCertificateProvider,
    CaUnreachableError,
    IdentityManager,
    WorkloadCertificate,
)
from node_agent.proxy.telemetry import RENEWAL_FAILURES, RENEWALS, ProxyMetrics
from testbed.proxy_fakes import LocalCaCertificates
from weir_common.errors import TransientError
from weir_common.mesh import SpiffeId

A = SpiffeId("cluster.local", "default", "a")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture
def ca(tmp_path):
    return load_or_create_root(tmp_path / "ca", "cluster.local", now=_now())


class OutageCa:
    """A CA that is unreachable while `down`, as CaCertificateProvider reports it."""

    def __init__(self, ca: CertificateAuthority, ttl: datetime.timedelta) -> None:
        self._ca = LocalCaCertificates(ca, ttl=ttl)
        self.down = False
        self.attempts = 0

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        self.attempts += 1
        if self.down:
            raise CaUnreachableError(f"CA unreachable for {identity}: UNAVAILABLE (test)")
        return self._ca.issue(identity)


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, timeout=30))


def test_renewal_due_during_an_outage_happens_within_a_second_of_the_return(ca):
    rotated: list[tuple[SpiffeId, float]] = []
    provider = OutageCa(ca, ttl=datetime.timedelta(seconds=4))
    metrics = ProxyMetrics()

    async def main() -> None:
        manager = IdentityManager(
            provider, lambda i: rotated.append((i, time.monotonic())), metrics=metrics
        )
        await manager.acquire(A)
        provider.down = True
        # Renewal falls due at about 2 s; the CA stays away until 8 s. Attempts
        # at most about a second apart make 6 or more by then (an exponential
        # backoff from 1 s would make 4 and be seconds from the next one).
        await asyncio.sleep(8)
        assert rotated == []
        assert metrics.value(RENEWAL_FAILURES) == provider.attempts - 1 >= 6
        provider.down = False
        back = time.monotonic()
        for _ in range(100):
            if rotated:
                break
            await asyncio.sleep(0.02)
        assert [identity for identity, _ in rotated] == [A]
        assert rotated[0][1] - back < 1.2
        assert metrics.value(RENEWALS) == 1
        current = manager.current(A)
        assert current is not None and current.not_after > _now() + datetime.timedelta(seconds=3)
        await manager.close()

    run(main())


def test_a_held_certificate_serves_a_new_pod_while_the_ca_is_away(ca):
    provider = OutageCa(ca, ttl=datetime.timedelta(hours=1))

    async def main() -> None:
        manager = IdentityManager(provider, lambda _: None)
        first = await manager.acquire(A)
        provider.down = True
        assert await manager.acquire(A) == first
        assert provider.attempts == 1
        assert manager.dump()[str(A)]["pods"] == 2
        await manager.close()

    run(main())


def test_an_expired_certificate_is_never_handed_out(ca):
    rotated: list[SpiffeId] = []
    provider = OutageCa(ca, ttl=datetime.timedelta(seconds=1))

    async def main() -> None:
        manager = IdentityManager(provider, rotated.append)
        await manager.acquire(A)
        provider.down = True
        await asyncio.sleep(1.3)  # expired, its renewal failing
        with pytest.raises(CaUnreachableError):
            await manager.acquire(A)
        assert manager.dump()[str(A)]["pods"] == 1  # the refused pod took nothing
        provider.down = False
        cert = await manager.acquire(A)
        assert cert.not_after > _now()
        assert A in rotated  # TLS contexts of the pods already there get the new one
        await manager.close()

    run(main())


class Signer:
    def __init__(self, code: Status) -> None:
        self.code = code

    async def request_certificate(
        self, spiffe_id: str, validity_seconds: int = 0
    ) -> IssuedCertificate:
        raise RpcError(self.code, f"{spiffe_id} (test)")


@pytest.mark.parametrize(
    ("code", "unreachable"),
    [
        (Status.UNAVAILABLE, True),
        (Status.DEADLINE_EXCEEDED, True),
        (Status.PERMISSION_DENIED, False),
        (Status.UNAUTHENTICATED, False),
    ],
)
def test_ca_provider_tells_an_unreachable_ca_from_a_refusal(code, unreachable):
    with pytest.raises(TransientError, match=code.name) as failed:
        run(CaCertificateProvider(Signer(code)).fetch(A))
    assert isinstance(failed.value, CaUnreachableError) == unreachable
    assert failed.value.retryable
