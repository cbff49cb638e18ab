"""Workload keys, CSRs and certificate facts made through libcrypto (node_agent.openssl),
checked against the `cryptography` package and the control plane's own CA."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca import CertificateAuthority, load_or_create_root
from node_agent import openssl
from node_agent.controlplane_access import ControlPlaneEndpoint
from testbed.memory import in_fresh_interpreter, vm_rss_kib
from weir_common.errors import InvalidInputError
from weir_common.mesh import SpiffeId

IDENTITY = "spiffe://cluster.local/ns/shop/sa/checkout"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return load_or_create_root(
        tmp_path_factory.mktemp("ca"), "cluster.local", now=datetime.datetime.now(datetime.UTC)
    )


def test_csr_names_only_the_identity_and_is_signed_by_the_key() -> None:
    key_pem, csr_pem = openssl.new_key_and_csr(IDENTITY)
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == "sha256"
    (extension,) = csr.extensions
    assert extension.critical
    assert extension.value == x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(IDENTITY)]
    )

    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == csr.public_key()


def test_every_csr_has_a_key_of_its_own() -> None:
    first, _ = openssl.new_key_and_csr(IDENTITY)
    second, _ = openssl.new_key_and_csr(IDENTITY)
    assert first != second


def test_the_ca_signs_it_and_the_facts_match_the_certificate(ca: CertificateAuthority) -> None:
    key_pem, csr_pem = openssl.new_key_and_csr(IDENTITY)
    chain = ca.sign(
        csr_pem,
        SpiffeId.parse(IDENTITY),
        ttl=datetime.timedelta(hours=3),
        now=datetime.datetime.now(datetime.UTC),
    )
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    facts = openssl.certificate_facts("".join(chain))  # the first certificate of a chain

    assert facts == openssl.CertificateFacts(
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=format(leaf.serial_number, "x"),
    )
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == leaf.public_key()


@pytest.mark.parametrize("serial", [0x0AC88E9E, 0x0F, 0x100, 2**159 - 1, 0x01_00000000_00000000])
def test_the_serial_reads_as_the_control_plane_prints_it(serial: int) -> None:
    # BN_bn2hex prints whole bytes: a serial whose top nibble is zero once came
    # back with a leading "0" (random serials hit that one time in sixteen).
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "serial test")])
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    assert openssl.certificate_facts(pem).serial == f"{serial:x}"


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        ("", "reading the certificate failed: .*no start line"),
        (
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "reading the certificate failed: .*(asn1|ASN1|decode)",
        ),
    ],
)
def test_no_certificate_is_a_clear_error(pem: str, reason: str) -> None:
    with pytest.raises(openssl.OpenSslError, match=reason):
        openssl.certificate_facts(pem)
    # The error queue was drained into the message: the next call starts clean.
    assert openssl.libcrypto().ERR_get_error() == 0


def test_nothing_is_left_allocated(ca: CertificateAuthority) -> None:
    chain = "".join(
        ca.sign(
            openssl.new_key_and_csr(IDENTITY)[1],
            SpiffeId.parse(IDENTITY),
            ttl=None,
            now=datetime.datetime.now(datetime.UTC),
        )
    )

    def churn(rounds: int) -> None:
        for _ in range(rounds):
            openssl.new_key_and_csr(IDENTITY)
            openssl.certificate_facts(chain)
            with pytest.raises(openssl.OpenSslError):
                openssl.certificate_facts("junk")

    churn(300)  # allocator and caches warm
    before = vm_rss_kib()
    churn(3000)
    # A leak of any of the objects made per call (key, CSR, names, BIOs, a
    # certificate, ~0.3-2 KiB each) would grow RSS by megabytes over 3,000 rounds.
    assert vm_rss_kib() - before < 1024


def test_a_node_proxy_loads_neither_grpcio_nor_cryptography() -> None:
    # Together about 17 MiB of a proxy's resident memory, for a handful of calls
    # (node_agent.openssl, node_agent.proxy.controlplane).
    loaded = in_fresh_interpreter(
        "import sys, node_agent.proxy.cli;"
        " print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'cryptography'}))"
    )
    assert loaded.strip() == "[]"


def test_mesh_roots_are_checked_as_the_tls_client_loads_them(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_text("".join(ca.trust_bundle_pem))
    assert ControlPlaneEndpoint.tls("cp:15012", roots).trust_roots_pem == roots.read_bytes()

    for content, reason in (
        ("", "no PEM certificate in it"),
        ("not pem at all", "no PEM certificate in it"),
        (
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "cannot load mesh root PEM",
        ),
    ):
        roots.write_text(content)
        with pytest.raises(InvalidInputError, match=reason):
            ControlPlaneEndpoint.tls("cp:15012", roots)
