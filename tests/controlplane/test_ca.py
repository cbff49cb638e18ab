"""The CA over real gRPC: signed certs verify with openssl; refusals are clear and counted."""

import asyncio
import subprocess

import grpc
import pytest
from cp_testing import TOKENS, endpoint, node_client, running_plane
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane import metrics as m
from weir_common._generated.weir.v1 import ca_pb2, ca_pb2_grpc
from weir_common.mesh import auth_metadata
from weir_common.retry import Backoff

pytestmark = pytest.mark.timeout(60)
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


def _csr(uris, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_signed_certificate_verifies_with_openssl(tmp_path):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            async with node_client(plane, tmp_path, "node-1") as client:
                issued = await client.request_certificate(CLIENT_ID)
            return plane.metrics.value(m.CERTS_SIGNED), issued

    signed, issued = asyncio.run(scenario())
    assert signed == 1
    leaf_path, root_path = tmp_path / "leaf.pem", tmp_path / "root.pem"
    leaf_path.write_text(issued.chain_pem[0])
    root_path.write_text("".join(issued.trust_bundle_pem))
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root_path), str(leaf_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{leaf_path}: OK"
    leaf = x509.load_pem_x509_certificate(issued.chain_pem[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [CLIENT_ID]
    assert isinstance(leaf.public_key().curve, ec.SECP256R1)
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 24 * 3600 + 300
    key = serialization.load_pem_private_key(issued.private_key_pem, None)
    assert key.public_key() == leaf.public_key()
    # The root persisted in the state dir is the one that signed.
    assert (tmp_path / "state" / "root-cert.pem").read_text() == issued.trust_bundle_pem[0]


@pytest.mark.parametrize(
    ("token", "spiffe_id", "csr", "code", "reason"),
    [
        # server runs on node-2, not on node-1
        ("node-1", SERVER_ID, _csr([SERVER_ID]), grpc.StatusCode.PERMISSION_DENIED, "not_on_node"),
        (
            "unknown",
            CLIENT_ID,
            _csr([CLIENT_ID]),
            grpc.StatusCode.UNAUTHENTICATED,
            "unauthenticated",
        ),
        ("node-1", CLIENT_ID, _csr([SERVER_ID]), grpc.StatusCode.INVALID_ARGUMENT, "san_mismatch"),
        (
            "node-1",
            CLIENT_ID,
            _csr([CLIENT_ID, SERVER_ID]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "san_mismatch",
        ),
        ("node-1", CLIENT_ID, _csr([]), grpc.StatusCode.INVALID_ARGUMENT, "san_mismatch"),
        (
            "node-1",
            CLIENT_ID,
            "-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n",
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed_csr",
        ),
        (
            "node-1",
            CLIENT_ID,
            _csr([CLIENT_ID], rsa.generate_private_key(65537, 2048)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_key",
        ),
        (
            "node-1",
            "spiffe://other.domain/ns/default/sa/client",
            _csr(["spiffe://other.domain/ns/default/sa/client"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_identity",
        ),
    ],
)
def test_refusals_have_a_clear_status_and_are_counted(
    tmp_path, token, spiffe_id, csr, code, reason
):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            async with endpoint(plane, tmp_path).open_channel(Backoff()) as channel:
                stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.SignCertificate(
                        ca_pb2.SignCertificateRequest(csr_pem=csr, spiffe_id=spiffe_id),
                        metadata=auth_metadata(TOKENS.get(token, "x" * 20)),
                        timeout=5,
                    )
            assert failure.value.code() == code
            assert failure.value.details()
            assert plane.metrics.value(m.CERTS_REFUSED, reason=reason) == 1
            assert plane.metrics.value(m.CERTS_SIGNED) == 0
            assert f'reason="{reason}"' in plane.metrics.render()

    asyncio.run(scenario())
