"""The CA's signing path: SignCertificate with hostile CSRs, identities and validities.

Through the real servicer (node authentication, the node's identity check,
the CSR check, signing): every request is signed for exactly the identity the
node may have, or refused with a gRPC status and a message and counted in
weir_controlplane_certificates_refused_total. Anything else is a crash.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import re
from typing import Any, Final

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from controlplane import metrics as m
from controlplane.auth import BootstrapTokenAuthenticator
from controlplane.ca import CertificateAuthority, generate_root, root_authority
from controlplane.config_file import parse_bytes
from controlplane.mesh import MeshConfig
from controlplane.services import CertificateService
from controlplane.state import MeshState
from tests.fuzz.fuzzing import CORPUS, budget, file_timeout, inputs, regressions, seeds
from weir_common._generated.weir.v1 import ca_pb2
from weir_common.mesh import auth_metadata

pytestmark = file_timeout()

NOW: Final = datetime.datetime(2026, 11, 30, 3, 0, tzinfo=datetime.UTC)
MESH: Final = parse_bytes((CORPUS / "config_file" / "mesh.yaml").read_bytes(), source="mesh.yaml")
NODE: Final = "node-1"
MINE: Final = "spiffe://cluster.local/ns/default/sa/client"  # a workload on node-1
IDENTITIES: Final = (
    MINE,
    "spiffe://cluster.local/ns/legacy/sa/intruder",  # also on node-1
    "spiffe://cluster.local/ns/default/sa/server",  # on node-2
    "spiffe://other.domain/ns/default/sa/client",
    "spiffe://cluster.local/ns/default/sa/client/x",
    "spiffe://cluster.local/ns/default/sa/",
    "",
)
CSRS = seeds("csr")
_PEM = re.compile(
    rb"-----BEGIN CERTIFICATE REQUEST-----\n(.*)-----END CERTIFICATE REQUEST-----", re.S
)


class _AbortedError(Exception):
    """What grpc.aio's context.abort raises, carrying the status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Context:
    def __init__(self, token: str) -> None:
        self._metadata = auth_metadata(token)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _AbortedError(code, details)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    cert_pem, key_pem = generate_root(MESH.trust_domain, now=NOW)
    return root_authority(cert_pem, key_pem, source="fuzz root")


def _refusals(metrics: m.Metrics) -> float:
    reasons = ("malformed_csr", "bad_key", "san_mismatch", "bad_identity", "not_on_node")
    return sum(
        metrics.value(m.CERTS_REFUSED, reason=r)
        for r in (*reasons, "bad_validity", "unauthenticated")
    )


def _sign(
    ca: CertificateAuthority, mesh: MeshConfig, csr_pem: str, spiffe_id: str, validity: int
) -> None:
    """One request through the servicer; asserts it is signed as asked or refused and counted."""
    metrics = m.Metrics()
    service = CertificateService(
        ca,
        BootstrapTokenAuthenticator(lambda: mesh),
        MeshState(mesh, ca.trust_bundle_pem, publish=lambda _snapshot: None),
        metrics,
        clock=lambda: NOW,
    )
    request = ca_pb2.SignCertificateRequest(
        csr_pem=csr_pem, spiffe_id=spiffe_id, validity_seconds=validity
    )
    context: Any = _Context(mesh.nodes[NODE].bootstrap_token)
    try:
        response = asyncio.run(service.SignCertificate(request, context))
    except _AbortedError as e:
        assert e.details and e.code is not grpc.StatusCode.OK
        assert _refusals(metrics) == 1, "a refusal must be counted by its reason"
        return
    assert metrics.value(m.CERTS_SIGNED) == 1
    leaf = x509.load_pem_x509_certificate(response.certificate_chain_pem[0].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(spiffe_id)]
    assert spiffe_id in (MINE, IDENTITIES[1])
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert leaf.public_key() == csr.public_key()


def _rewrap(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _der(pem: bytes) -> bytes:
    found = _PEM.search(pem)
    assert found is not None
    return base64.b64decode(found[1])


# Wrong key types and curves, besides the right one; made once, they are slow to make.
@pytest.fixture(scope="module")
def keys() -> list[Any]:
    return [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP521R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate(),
    ]


GENERAL_NAMES = st.one_of(
    st.sampled_from(IDENTITIES).filter(bool).map(x509.UniformResourceIdentifier),
    # The builder takes only ASCII URIs; what a hostile node can put there is any bytes,
    # which the byte-level mutations below cover.
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64).map(
        lambda t: x509.UniformResourceIdentifier("spiffe://" + t)
    ),
    st.sampled_from(("server.default.svc", "*.cluster.local", "a" * 63)).map(x509.DNSName),
    st.sampled_from(("10.0.0.1", "::1")).map(lambda ip: x509.IPAddress(ipaddress.ip_address(ip))),
    st.just(x509.RFC822Name("client@cluster.local")),
    st.just(x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4"))),
    st.just(x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x01a")),
)
SUBJECTS = st.one_of(
    st.just(x509.Name([])),
    # Up to 64 UTF-8 bytes is what the builder takes for a common name.
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64).map(
        lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ),
    st.integers(1, 20_000).map(
        lambda n: x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * n)])
    ),
)


@budget(60)
@given(
    st.integers(0, 4),
    st.lists(GENERAL_NAMES, max_size=4),
    SUBJECTS,
    st.booleans(),
    st.sampled_from(IDENTITIES),
    st.sampled_from((0, 1, 3600, 86_400, 172_800, 172_801, 2**32 - 1)),
)
def test_built_csrs_are_signed_or_refused(
    ca: CertificateAuthority,
    keys: list[Any],
    key_index: int,
    names: list[x509.GeneralName],
    subject: x509.Name,
    critical: bool,
    spiffe_id: str,
    validity: int,
) -> None:
    key = keys[key_index]
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    pem = builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()
    _sign(ca, MESH, pem, spiffe_id, validity)


@budget(200)
@given(inputs(CSRS, max_ops=3), st.sampled_from(IDENTITIES))
def test_mutated_pem_is_signed_or_refused(
    ca: CertificateAuthority, data: bytes, spiffe_id: str
) -> None:
    _sign(ca, MESH, data.decode("utf-8", "replace"), spiffe_id, 0)


@budget(200)
@given(inputs([_der(pem) for pem in CSRS], max_ops=3), st.sampled_from(IDENTITIES))
def test_mutated_der_is_signed_or_refused(
    ca: CertificateAuthority, der: bytes, spiffe_id: str
) -> None:
    _sign(ca, MESH, _rewrap(der), spiffe_id, 0)


@pytest.mark.parametrize("data", regressions("csr"))
def test_regression(ca: CertificateAuthority, data: bytes) -> None:
    _sign(ca, MESH, data.decode(), MINE, 0)


def test_oversized_csr_is_refused(ca: CertificateAuthority) -> None:
    huge = CSRS[0].decode() + "\n" * 20_000
    _sign(ca, MESH, huge, MINE, 0)
