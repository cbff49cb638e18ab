"""What operators and agents rely on beyond the happy path: refusals, an operator
CA, the HTTP endpoints, and how the root key is kept on disk."""

import asyncio
import datetime
import json
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
from cp_testing import (
    TOKENS,
    RecordingHandler,
    node_client,
    running_plane,
    subscribed,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane import metrics as m
from controlplane.ca import ROOT_CERT_FILE, ROOT_KEY_FILE, load_intermediate, load_or_create_root
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import ControlPlaneClient
from weir_common.errors import InvalidInputError

pytestmark = pytest.mark.timeout(60)
NOW = datetime.datetime.now(datetime.UTC)
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


def test_registration_refusals_have_a_clear_status_and_are_counted(tmp_path):
    async def scenario():
        async with (
            running_plane(tmp_path) as plane,
            node_client(plane, tmp_path, "node-1") as node_1,
            node_client(plane, tmp_path, "node-2") as node_2,
        ):
            await node_1.register_workload(
                namespace="default", name="client", uid="uid-1", ips=["10.1.0.5"]
            )
            attempts = [
                (
                    node_1.register_workload(
                        namespace="default", name="ghost", uid="u", ips=["10.1.0.9"]
                    ),
                    grpc.StatusCode.NOT_FOUND,
                    "unknown_workload",
                ),
                (
                    node_1.register_workload(
                        namespace="default", name="server", uid="u", ips=["10.1.0.6"]
                    ),
                    grpc.StatusCode.PERMISSION_DENIED,
                    "not_on_node",
                ),
                (
                    node_2.register_workload(
                        namespace="default", name="server", uid="u", ips=["10.1.0.5"]
                    ),
                    grpc.StatusCode.ALREADY_EXISTS,
                    "ip_in_use",
                ),
                (
                    node_1.deregister_workload(namespace="default", name="client", uid="uid-2"),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "uid_mismatch",
                ),
                (
                    node_2.deregister_workload(namespace="default", name="client", uid="uid-1"),
                    grpc.StatusCode.PERMISSION_DENIED,
                    "not_on_node",
                ),
            ]
            for attempt, code, _ in attempts:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await attempt
                assert failure.value.code() == code, failure.value.details()
                assert failure.value.details()
            # Nothing was half-applied: the one good registration stands as made.
            registration = plane.state.registrations["default/client"]
            assert (registration.node, registration.uid, registration.ips) == (
                "node-1",
                "uid-1",
                ("10.1.0.5",),
            )
            assert set(plane.state.registrations) == {"default/client"}
            refused = {
                reason: plane.metrics.value(m.REGISTRATIONS_REFUSED, reason=reason)
                for _, _, reason in attempts
            }
            assert refused == {
                "unknown_workload": 1,
                "not_on_node": 2,
                "ip_in_use": 1,
                "uid_mismatch": 1,
            }
            assert plane.metrics.value(m.REGISTRATIONS, operation="register") == 1

    asyncio.run(scenario())


# -- an operator-provided intermediate --------------------------------------------


def _ca_cert(subject, key, issuer=None, issuer_key=None, path_length=None):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name = name if issuer is None else issuer.subject
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key or key, hashes.SHA256())
    )


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture
def operator_ca(tmp_path):
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Operator Root", root_key)
    key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _ca_cert("Weir Intermediate", key, root, root_key, path_length=0)
    paths = {
        "root": tmp_path / "operator-root.pem",
        "cert": tmp_path / "intermediate.pem",
        "key": tmp_path / "intermediate-key.pem",
    }
    paths["root"].write_bytes(_pem(root))
    paths["cert"].write_bytes(_pem(intermediate))
    paths["key"].write_bytes(_key_pem(key))
    return paths


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_operator_intermediate_signs_chains_that_openssl_verifies(tmp_path, operator_ca):
    from cp_testing import MESH_YAML  # noqa: PLC0415

    config = tmp_path / "mesh.yaml"
    config.write_text(MESH_YAML)
    grpc_port, http_port = _free_port(), _free_port()
    plane = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from controlplane.cli import main; sys.exit(main())",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{grpc_port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--state-dir",
            str(tmp_path / "state"),
            "--ca-cert",
            str(operator_ca["cert"]),
            "--ca-key",
            str(operator_ca["key"]),
            "--ca-roots",
            str(operator_ca["root"]),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(http_port, plane)

        async def request():
            # The serving certificate, too, chains to the operator's root.
            endpoint = ControlPlaneEndpoint.tls(f"127.0.0.1:{grpc_port}", operator_ca["root"])
            async with ControlPlaneClient(endpoint, "node-1", TOKENS["node-1"]) as client:
                return await client.request_certificate(CLIENT_ID)

        issued = asyncio.run(request())
    finally:
        plane.terminate()
        _, stderr = plane.communicate(timeout=15)
    assert plane.returncode == 0, stderr
    assert len(issued.chain_pem) == 2
    assert issued.chain_pem[1].encode() == operator_ca["cert"].read_bytes()
    assert issued.trust_bundle_pem == (operator_ca["root"].read_text(),)
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(issued.chain_pem[0])
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(operator_ca["root"]),
            "-untrusted",
            str(operator_ca["cert"]),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.strip() == f"{leaf}: OK"
    # Without the intermediate the leaf does not verify: it was not signed by the root.
    alone = subprocess.run(
        ["openssl", "verify", "-CAfile", str(operator_ca["root"]), str(leaf)],
        capture_output=True,
        check=False,
    )
    assert alone.returncode != 0
    # No root was generated: the operator's CA is the only one.
    assert not (tmp_path / "state" / ROOT_KEY_FILE).exists()


def _wait_ready(http_port, process):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"control plane exited: {process.communicate()[1]}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{http_port}/healthz/ready", timeout=1
            ) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    pytest.fail("control plane not ready after 20 s")


def test_operator_intermediate_is_checked_when_loaded(tmp_path, operator_ca):
    other_key = ec.generate_private_key(ec.SECP256R1())
    wrong_key = tmp_path / "wrong-key.pem"
    wrong_key.write_bytes(_key_pem(other_key))
    with pytest.raises(InvalidInputError, match="is not the key of the certificate"):
        load_intermediate(operator_ca["cert"], wrong_key, operator_ca["root"])
    stranger = tmp_path / "stranger-root.pem"
    stranger.write_bytes(_pem(_ca_cert("Stranger", other_key)))
    with pytest.raises(InvalidInputError, match="does not lead to a root"):
        load_intermediate(operator_ca["cert"], operator_ca["key"], stranger)


# -- HTTP endpoints ---------------------------------------------------------------


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_http_endpoints_and_a_config_dump_without_secrets(tmp_path):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            handler = RecordingHandler()
            async with (
                subscribed(plane, tmp_path, "node-1", handler),
                node_client(plane, tmp_path, "node-1") as client,
            ):
                await handler.wait_for(lambda: len(handler.states) == 4)
                await client.register_workload(
                    namespace="default", name="client", uid="uid-1", ips=["10.1.0.5"]
                )
                await client.request_certificate(CLIENT_ID)
                return {
                    path: await asyncio.to_thread(_get, plane.http_port, path)
                    for path in (
                        "/healthz",
                        "/healthz/ready",
                        "/metrics",
                        "/debug/config_dump",
                        "/nope",
                    )
                }

    replies = asyncio.run(scenario())
    assert replies["/healthz"][:2] == (200, "text/plain")
    assert replies["/healthz/ready"][0] == 200
    assert replies["/nope"][0] == 404
    status, content_type, metrics = replies["/metrics"]
    assert (status, content_type) == (200, "text/plain; version=0.0.4")
    assert "weir_controlplane_connected_nodes 1\n" in metrics
    assert "weir_controlplane_certificates_signed_total 1\n" in metrics
    assert 'weir_controlplane_registrations_total{operation="register"} 1\n' in metrics
    assert "weir_controlplane_xds_push_latency_seconds_count" in metrics
    status, content_type, body = replies["/debug/config_dump"]
    assert (status, content_type) == (200, "application/json")
    dump = json.loads(body)
    assert dump["registrations"]["default/client"]["ips"] == ["10.1.0.5"]
    assert [s["node"] for s in dump["streams"]] == ["node-1"]
    assert dump["mesh"]["nodes"] == ["node-1", "node-2"]
    assert dump["serving_certificate"]["names"] == ["localhost", "127.0.0.1"]
    for secret in (*TOKENS.values(), "PRIVATE KEY", "bootstrap"):
        assert secret not in body


def test_readiness_fails_while_draining_streams(tmp_path):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            handler = RecordingHandler()
            async with subscribed(plane, tmp_path, "node-1", handler):
                await handler.wait_for(lambda: len(handler.states) == 4)
                ready = await asyncio.to_thread(_get, plane.http_port, "/healthz/ready")
                # The open stream holds stop() in its grace period.
                stopping = asyncio.create_task(plane.stop(grace=2.0))
                await asyncio.sleep(0.2)
                draining = await asyncio.to_thread(_get, plane.http_port, "/healthz/ready")
                alive = await asyncio.to_thread(_get, plane.http_port, "/healthz")
                await stopping
            return ready[0], draining[0], alive[0]

    assert asyncio.run(scenario()) == (200, 503, 200)


# -- the root key on disk ----------------------------------------------------------


def test_state_dir_with_the_root_key_is_private(tmp_path):
    state = tmp_path / "var" / "lib" / "weir" / "controlplane"
    first = load_or_create_root(state, "cluster.local", now=NOW)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / ROOT_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((state / ROOT_CERT_FILE).stat().st_mode) == 0o600
    # A restart finds the same root instead of making a new one.
    again = load_or_create_root(state, "cluster.local", now=NOW)
    assert again.trust_bundle_pem == first.trust_bundle_pem
