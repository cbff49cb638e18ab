"""Workload certificates: real SVIDs from the control plane CA, rotation, TLS identity."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl

import pytest
import uvloop
from cryptography import x509

from controlplane.ca import load_or_create_root
from node_agent.controlplane_access import IssuedCertificate, Status
from node_agent.proxy import tls
from node_agent.proxy.controlplane import RpcError
from node_agent.proxy.identity import CaCertificateProvider, IdentityManager, WorkloadCertificate
from testbed.proxy_fakes import LocalCaCertificates, make_csr
from weir_common.errors import TransientError
from weir_common.mesh import SpiffeId

A = SpiffeId("cluster.local", "default", "a")
B = SpiffeId("cluster.local", "default", "b")


def _now():
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture
def ca(tmp_path):
    return load_or_create_root(tmp_path / "ca", "cluster.local", now=_now())


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, timeout=20))


def test_refresh_at_half_the_remaining_life():
    received = _now()
    cert = WorkloadCertificate(
        (),
        b"",
        received - datetime.timedelta(minutes=5),
        received + datetime.timedelta(hours=24),
        "1",
    )
    assert cert.refresh_at(received) == received + datetime.timedelta(hours=12)


def test_rotates_before_expiry_and_says_so(ca):
    rotated: list[SpiffeId] = []
    provider = LocalCaCertificates(ca, ttl=datetime.timedelta(seconds=2))

    async def main():
        manager = IdentityManager(provider, rotated.append)
        first = await manager.acquire(A)
        for _ in range(40):
            if rotated:
                break
            await asyncio.sleep(0.05)
        assert rotated == [A]
        second = manager.current(A)
        assert second is not None and second.chain_pem != first.chain_pem
        assert second.not_after > first.not_after
        await manager.close()

    run(main())


def test_failed_renewal_keeps_the_old_cert_and_retries(ca):
    rotated: list[SpiffeId] = []
    provider = LocalCaCertificates(ca, ttl=datetime.timedelta(seconds=2))

    async def main():
        manager = IdentityManager(provider, rotated.append)
        first = await manager.acquire(A)
        provider.fail_next = 1
        # The renewal is due at half the certificate's life: 0.5-1 s here, as
        # X.509 times are whole seconds. Waited for rather than slept past: the
        # retry comes 0.5-1 s after the failure (its backoff is jittered).
        for _ in range(60):
            if provider.fail_next == 0:
                break
            await asyncio.sleep(0.05)
        assert provider.fail_next == 0, "the renewal was never tried"
        assert not rotated
        assert manager.current(A) == first
        for _ in range(60):  # the retry succeeds
            if rotated:
                break
            await asyncio.sleep(0.05)
        assert rotated == [A]
        await manager.close()

    run(main())


def test_certificate_is_held_while_any_pod_uses_it(ca):
    provider = LocalCaCertificates(ca)

    async def main():
        manager = IdentityManager(provider, lambda _: None)
        await manager.acquire(A)
        await manager.acquire(A)
        assert provider.issued == [A]  # one fetch for both pods
        manager.release(A)
        assert manager.current(A) is not None
        manager.release(A)
        assert manager.current(A) is None
        assert manager.dump() == {}
        await manager.close()

    run(main())


def _handshake(server_ctx, client_ctx):
    """(server's view of the client, client's view of the server), in memory; raises SSLError."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=None)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):  # TLS 1.3 needs two round trips; more means something is wrong
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if all(done.values()):
            # The server's verdict on the client certificate reaches the client only now.
            with contextlib.suppress(ssl.SSLWantReadError):
                client.read(1)
            return tls.peer_identity(server), tls.peer_identity(client)
    raise AssertionError("handshake did not finish")


def test_mutual_tls_reveals_both_spiffe_ids(ca):
    provider = LocalCaCertificates(ca)
    bundle = ca.trust_bundle_pem
    server_ctx = tls.server_context(provider.issue(B), bundle)
    client_ctx = tls.client_context(provider.issue(A), bundle)
    assert _handshake(server_ctx, client_ctx) == (A, B)
    assert client_ctx.minimum_version is ssl.TLSVersion.TLSv1_3


def test_client_from_another_ca_is_refused(ca, tmp_path):
    foreign = load_or_create_root(tmp_path / "foreign", "cluster.local", now=_now())
    server_ctx = tls.server_context(LocalCaCertificates(ca).issue(B), ca.trust_bundle_pem)
    rogue = LocalCaCertificates(foreign).issue(A)
    client_ctx = tls.client_context(rogue, foreign.trust_bundle_pem + ca.trust_bundle_pem)
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        _handshake(server_ctx, client_ctx)


def test_server_from_another_ca_is_refused(ca, tmp_path):
    foreign = load_or_create_root(tmp_path / "foreign", "cluster.local", now=_now())
    rogue = LocalCaCertificates(foreign).issue(B)
    server_ctx = tls.server_context(rogue, foreign.trust_bundle_pem + ca.trust_bundle_pem)
    client_ctx = tls.client_context(LocalCaCertificates(ca).issue(A), ca.trust_bundle_pem)
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        _handshake(server_ctx, client_ctx)


class Signer:
    """Stands in for the control plane client: signs with the in-process CA, or refuses."""

    def __init__(self, ca, refuse: Status | None = None):
        self.ca = ca
        self.refuse = refuse
        self.asked: list[tuple[str, int]] = []

    async def request_certificate(self, spiffe_id: str, validity_seconds: int = 0):
        self.asked.append((spiffe_id, validity_seconds))
        if self.refuse is not None:
            raise RpcError(self.refuse, "no workload here")
        csr, key = make_csr(SpiffeId.parse(spiffe_id))
        chain = self.ca.sign(csr, SpiffeId.parse(spiffe_id), ttl=None, now=_now())
        return IssuedCertificate(key, tuple(chain), tuple(self.ca.trust_bundle_pem))


def test_ca_provider_asks_for_the_identity_and_returns_its_svid(ca):
    signer = Signer(ca)
    cert = run(CaCertificateProvider(signer, validity_seconds=3600).fetch(A))
    assert signer.asked == [(str(A), 3600)]
    leaf = x509.load_pem_x509_certificate(cert.chain_pem[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(A)]


def test_ca_refusal_is_a_retryable_error(ca):
    with pytest.raises(TransientError, match="PERMISSION_DENIED: no workload here") as info:
        run(CaCertificateProvider(Signer(ca, Status.PERMISSION_DENIED)).fetch(A))
    assert info.value.retryable
