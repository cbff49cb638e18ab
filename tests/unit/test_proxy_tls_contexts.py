"""TlsContexts: checked at install, built on first use, replaced whole on rotation."""

from __future__ import annotations

import datetime
import ssl
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from controlplane.ca import CertificateAuthority, load_or_create_root
from node_agent.proxy import tls as tls_mod
from node_agent.proxy.identity import WorkloadCertificate
from node_agent.proxy.state import TlsContexts
from testbed.proxy_fakes import LocalCaCertificates, self_signed_root_pem
from weir_common.mesh import SpiffeId

A = SpiffeId("cluster.local", "shop", "checkout")
B = SpiffeId("cluster.local", "shop", "cart")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return load_or_create_root(
        tmp_path_factory.mktemp("ca"), "cluster.local", now=datetime.datetime.now(datetime.UTC)
    )


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many server and client contexts were built."""
    counts: Counter[str] = Counter()

    def counting(
        kind: str, build: Callable[[WorkloadCertificate, Sequence[str]], ssl.SSLContext]
    ) -> Callable[[WorkloadCertificate, Sequence[str]], ssl.SSLContext]:
        def wrapped(cert: WorkloadCertificate, bundle: Sequence[str]) -> ssl.SSLContext:
            counts[kind] += 1
            return build(cert, bundle)

        return wrapped

    monkeypatch.setattr(tls_mod, "server_context", counting("server", tls_mod.server_context))
    monkeypatch.setattr(tls_mod, "client_context", counting("client", tls_mod.client_context))
    return counts


def test_contexts_are_built_on_first_use_and_kept(
    ca: CertificateAuthority, builds: Counter[str]
) -> None:
    issuer = LocalCaCertificates(ca)
    contexts = TlsContexts()
    for identity in (A, B):
        contexts.install(identity, issuer.issue(identity), ca.trust_bundle_pem)
    assert builds == {"server": 2}  # the checks, not kept
    assert A in contexts and B in contexts

    server = contexts.server(A)
    assert contexts.server(A) is server
    assert builds == {"server": 3}  # B, which nothing used, has none
    client = contexts.client(A)
    assert contexts.client(A) is client
    assert builds == {"server": 3, "client": 1}
    assert server.generation == client.generation
    assert server.context.verify_mode == client.context.verify_mode == ssl.CERT_REQUIRED


def test_rotation_replaces_both_under_a_new_generation(ca: CertificateAuthority) -> None:
    issuer = LocalCaCertificates(ca)
    contexts = TlsContexts()
    first = contexts.install(A, issuer.issue(A), ca.trust_bundle_pem)
    old_server, old_client = contexts.server(A), contexts.client(A)

    second = contexts.install(A, issuer.issue(A), ca.trust_bundle_pem)
    assert second > first
    assert contexts.server(A) is not old_server and contexts.client(A) is not old_client
    assert contexts.server(A).generation == contexts.client(A).generation == second


def test_bad_material_is_refused_at_install_and_changes_nothing(
    ca: CertificateAuthority,
) -> None:
    issuer = LocalCaCertificates(ca)
    contexts = TlsContexts()
    good = contexts.install(A, issuer.issue(A), ca.trust_bundle_pem)
    server = contexts.server(A)

    other = issuer.issue(B)
    mismatched = WorkloadCertificate(
        issuer.issue(A).chain_pem, other.private_key_pem, other.not_before, other.not_after, "0"
    )
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        contexts.install(A, mismatched, ca.trust_bundle_pem)
    with pytest.raises(ssl.SSLError):
        contexts.install(A, issuer.issue(A), ["not a certificate"])
    with pytest.raises(ssl.SSLError):
        contexts.install(B, mismatched, ca.trust_bundle_pem)

    assert contexts.server(A) is server and server.generation == good
    assert B not in contexts
    # A bundle that parses but is not the one that signed the certificate is the
    # control plane's to get right: it is taken (peers will fail verification).
    contexts.install(A, issuer.issue(A), [self_signed_root_pem()])


def test_discard_forgets_the_identity(ca: CertificateAuthority) -> None:
    contexts = TlsContexts()
    contexts.install(A, LocalCaCertificates(ca).issue(A), ca.trust_bundle_pem)
    contexts.client(A)
    contexts.discard(A)
    assert A not in contexts
    with pytest.raises(KeyError):
        contexts.server(A)
    with pytest.raises(KeyError):
        contexts.client(A)
