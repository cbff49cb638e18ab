"""The gRPC listener speaks TLS with a certificate from the mesh CA; clients verify it."""

import asyncio
import datetime
import logging
import socket
import ssl
import subprocess

import grpc
import pytest
from cp_testing import (
    FAST_BACKOFF,
    TOKENS,
    RecordingHandler,
    endpoint,
    node_client,
    root_file,
    running_plane,
    subscribed,
)
from cryptography import x509

from controlplane import metrics as m
from controlplane.app import Settings
from controlplane.ca import load_or_create_root
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import ControlPlaneClient
from weir_common.mesh import WORKLOAD_TYPE

pytestmark = pytest.mark.timeout(60)
NOW = datetime.datetime.now(datetime.UTC)


def _serving_certificate(port: int, cafile, server_hostname: str = "127.0.0.1") -> x509.Certificate:
    """Handshake as a TLS client that checks the chain and the name, as gRPC does."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_serving_certificate_chains_to_the_mesh_root_and_names_localhost(tmp_path):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            cert = await asyncio.to_thread(
                _serving_certificate, plane.grpc_port, root_file(tmp_path)
            )
            return cert, plane.config_dump()["serving_certificate"]

    cert, dump = asyncio.run(scenario())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert dump["serial"] == f"{cert.serial_number:x}"
    leaf = tmp_path / "serving.pem"
    leaf.write_text(dump["chain_pem"][0])
    verify = subprocess.run(
        ["openssl", "verify", "-purpose", "sslserver", "-CAfile", str(root_file(tmp_path)), leaf],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr


def test_client_trusting_another_root_is_refused_before_sending_its_token(tmp_path):
    other_root = load_or_create_root(tmp_path / "other", "cluster.local", now=NOW)
    other = tmp_path / "other-root.pem"
    other.write_text(other_root.trust_bundle_pem[0])

    async def scenario():
        async with running_plane(tmp_path) as plane:
            wrong = ControlPlaneEndpoint.tls(f"127.0.0.1:{plane.grpc_port}", other)
            async with ControlPlaneClient(wrong, "node-1", TOKENS["node-1"]) as client:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await client.register_workload(
                        namespace="default", name="client", uid="u", ips=["10.1.0.5"]
                    )
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            # The request never reached a handler: nothing accepted, nothing refused.
            assert plane.metrics.value(m.REGISTRATIONS, operation="register") == 0
            assert "weir_controlplane_registrations_refused_total 0" in plane.metrics.render()
            assert plane.state.registrations == {}

    asyncio.run(scenario())


def test_plaintext_client_cannot_talk_to_the_tls_listener(tmp_path):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            plain = ControlPlaneEndpoint.insecure(f"127.0.0.1:{plane.grpc_port}")
            async with ControlPlaneClient(plain, "node-1", TOKENS["node-1"]) as client:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await client.request_certificate("spiffe://cluster.local/ns/default/sa/client")
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            assert plane.metrics.value(m.CERTS_SIGNED) == 0

    asyncio.run(scenario())


def test_tokens_are_never_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario():
        async with running_plane(tmp_path) as plane:
            handler = RecordingHandler()
            async with subscribed(plane, tmp_path, "node-1", handler):
                await handler.wait_for(lambda: len(handler.states) == 4)
            async with node_client(plane, tmp_path, "node-1") as client:
                await client.register_workload(
                    namespace="default", name="client", uid="u", ips=["10.1.0.5"]
                )
                await client.request_certificate("spiffe://cluster.local/ns/default/sa/client")
                for refused in (
                    client.request_certificate("spiffe://cluster.local/ns/default/sa/server"),
                    client.register_workload(
                        namespace="default", name="server", uid="u", ips=["10.1.0.6"]
                    ),
                ):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await refused
            # A token that is almost right is not echoed either.
            almost = ControlPlaneClient(endpoint(plane, tmp_path), "node-1", TOKENS["node-1"] + "x")
            async with almost:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await almost.register_workload(
                        namespace="default", name="client", uid="u", ips=["10.1.0.5"]
                    )
            assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
            return plane.metrics.value(m.CERTS_REFUSED, reason="not_on_node"), failure.value

    refusals, failure = asyncio.run(scenario())
    assert refusals == 1
    assert "refused certificate to node node-1" in caplog.text  # the logs were captured
    for token in (*TOKENS.values(), TOKENS["node-1"] + "x"):
        assert token not in caplog.text
        assert token not in str(failure.details())


def test_serving_certificate_is_renewed_at_half_life_without_restart(tmp_path):
    # The control plane's clock starts an hour in the past so that every
    # certificate it issues is valid for the real clock the TLS clients use.
    now = [NOW - datetime.timedelta(minutes=61)]
    settings = Settings(
        grpc_listen="127.0.0.1:0", http_listen=None, serving_ttl=datetime.timedelta(hours=2)
    )

    async def scenario():
        async with running_plane(tmp_path, settings=settings, clock=lambda: now[0]) as plane:
            port, root = plane.grpc_port, root_file(tmp_path)
            handler = RecordingHandler()
            async with subscribed(plane, tmp_path, "node-1", handler) as xds:
                await handler.wait_for(lambda: len(handler.states) == 4)
                first = await asyncio.to_thread(_serving_certificate, port, root)
                now[0] += datetime.timedelta(minutes=59)
                assert await asyncio.to_thread(_serving_certificate, port, root) == first
                now[0] += datetime.timedelta(minutes=2)  # past half life
                second = await asyncio.to_thread(_serving_certificate, port, root)
                assert second.serial_number != first.serial_number
                assert second.not_valid_after_utc > first.not_valid_after_utc
                assert plane.config_dump()["serving_certificate"]["serial"] == (
                    f"{second.serial_number:x}"
                )
                # The stream made before the renewal is untouched; new clients verify.
                assert xds.connected.is_set()
                async with node_client(plane, tmp_path, "node-1") as client:
                    await client.register_workload(
                        namespace="default", name="client", uid="u", ips=["10.1.0.5"]
                    )
                await handler.wait_for(
                    lambda: (
                        list(handler.states[WORKLOAD_TYPE]["default/client"].ips) == ["10.1.0.5"]
                    )
                )

    asyncio.run(scenario())


def test_configured_serving_names_are_checked_by_clients(tmp_path):
    settings = Settings(
        grpc_listen="127.0.0.1:0", http_listen=None, serving_names=("cp.weir.internal",)
    )

    async def scenario():
        async with running_plane(tmp_path, settings=settings) as plane:
            target = f"127.0.0.1:{plane.grpc_port}"
            named = ControlPlaneEndpoint.tls(target, root_file(tmp_path), "cp.weir.internal")
            async with ControlPlaneClient(named, "node-1", TOKENS["node-1"]) as client:
                await client.request_certificate("spiffe://cluster.local/ns/default/sa/client")
            # 127.0.0.1 is not a name of this certificate any more.
            by_ip = ControlPlaneEndpoint.tls(target, root_file(tmp_path))
            async with ControlPlaneClient(by_ip, "node-1", TOKENS["node-1"]) as client:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await client.request_certificate("spiffe://cluster.local/ns/default/sa/client")
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            return plane.metrics.value(m.CERTS_SIGNED)

    assert asyncio.run(scenario()) == 1


def test_insecure_listen_is_plaintext_and_says_so_loudly(tmp_path, caplog):
    settings = Settings(grpc_listen="127.0.0.1:0", http_listen=None, insecure=True)

    async def scenario():
        async with running_plane(tmp_path, settings=settings) as plane:
            assert plane.config_dump()["serving_certificate"] is None
            plain = ControlPlaneEndpoint.insecure(f"127.0.0.1:{plane.grpc_port}")
            async with ControlPlaneClient(
                plain, "node-1", TOKENS["node-1"], backoff=FAST_BACKOFF
            ) as client:
                await client.register_workload(
                    namespace="default", name="client", uid="u", ips=["10.1.0.5"]
                )
            # A TLS client does not silently fall back to plaintext.
            async with node_client(plane, tmp_path, "node-1") as client:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await client.register_workload(
                        namespace="default", name="client", uid="u", ips=["10.1.0.5"]
                    )
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("INSECURE" in r.getMessage() and "PLAINTEXT" in r.getMessage() for r in warnings)
