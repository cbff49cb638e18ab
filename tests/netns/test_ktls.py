"""Kernel TLS: what decides it, the records a kTLS socket meets, and real pairs in a netns.

Each pair test takes the path this host allows and proves that path: kTLS
both ways where the kernel has the `tls` ULP and OpenSSL gives it both keys
(on Debian 12's OpenSSL 3.0 that is TLS 1.2 only), otherwise the refusal with
its reason, checked against the kernel's own answer, and the memory-BIO
fallback carrying the same bytes.

The development VM's kernel has no TLS (CONFIG_TLS off, no modules), so here
the refusal path runs. The kTLS path was run by booting Debian 12's
6.12 kernel (linux-image-6.12.*-amd64, its tls and crypto modules in an
initramfs) under qemu with this tree shared read-only over 9p, running this
file: TLS 1.2 went both ways (tls_stat 2 TX + 2 RX), TLS 1.3 was refused
after the handshake with "took transmit but not receive".
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import functools
import hashlib
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from cryptography import x509

from controlplane.ca import load_or_create_root
from node_agent.constants import INBOUND_TUNNEL_PORT
from node_agent.localmesh.wiring import NETNS_DIR, create_netns, delete_netns, links
from node_agent.netns import Netns, entered
from node_agent.proxy import ktls, tls
from testbed.proxy_fakes import LocalCaCertificates
from testbed.proxy_lab import EnvoyProcess, envoy_hbone_server, write_svid
from weir_common.mesh import SpiffeId

pytestmark = pytest.mark.netns

CLIENT_ID = SpiffeId("cluster.local", "ns1", "client")
SERVER_ID = SpiffeId("cluster.local", "ns2", "server")
MIB = 1024 * 1024
HANDSHAKE_TIMEOUT = 10.0
EXCHANGE_TIMEOUT = 120.0
T = TypeVar("T")


def run(coro_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """On uvloop, as the proxy runs."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_factory())


# --- what decides kTLS -------------------------------------------------------


def test_no_option_no_ktls() -> None:
    reason = ktls.assess(
        available_ulps="tls", openssl_version=(3, 2, 0), ktls_option=False, tls13=True
    )
    assert reason is not None and "SSL_OP_ENABLE_KTLS" in reason


def test_kernel_without_ulps_or_tls_ulp() -> None:
    missing = ktls.assess(available_ulps=None, openssl_version=(3, 2), ktls_option=True, tls13=True)
    assert missing is not None and "tcp_available_ulp is missing" in missing
    no_tls = ktls.assess(
        available_ulps="mptcp\n", openssl_version=(3, 2), ktls_option=True, tls13=True
    )
    assert no_tls is not None and "no 'tls' TCP ULP (available: mptcp)" in no_tls
    # A ULP whose name merely contains "tls" is not the tls ULP.
    assert ktls.assess(
        available_ulps="espintcp mptcp_tls", openssl_version=(3, 2), ktls_option=True, tls13=False
    )


def test_openssl_30_gives_tls13_transmit_only() -> None:
    reason = ktls.assess(
        available_ulps="mptcp tls", openssl_version=(3, 0, 19), ktls_option=True, tls13=True
    )
    assert reason == (
        "OpenSSL 3.0.19 gives TLS 1.3 keys to the kernel for transmit only;"
        " receive needs OpenSSL 3.2"
    )
    assert (
        ktls.assess(
            available_ulps="mptcp tls", openssl_version=(3, 0, 19), ktls_option=True, tls13=False
        )
        is None
    )
    assert (
        ktls.assess(
            available_ulps="mptcp tls", openssl_version=(3, 2, 1), ktls_option=True, tls13=True
        )
        is None
    )


def test_enable_sets_the_option_and_stops_server_tickets() -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert server.num_tickets == 2
    ktls.enable(server)
    ktls.enable(client)
    assert server.options & ktls.SSL_OP_ENABLE_KTLS and client.options & ktls.SSL_OP_ENABLE_KTLS
    assert server.num_tickets == 0


# --- records a kTLS socket meets ---------------------------------------------


def _handshake_message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def test_data_and_close_notify() -> None:
    assert ktls.classify(ktls.RECORD_DATA, b"x") is ktls.RecordKind.DATA
    assert ktls.classify(ktls.RECORD_ALERT, b"\x01\x00") is ktls.RecordKind.END
    assert ktls.classify(ktls.RECORD_ALERT, b"\x02\x00") is ktls.RecordKind.END


def test_fatal_alert_fails() -> None:
    with pytest.raises(ktls.KtlsProtocolError, match="alert 0228"):
        ktls.classify(ktls.RECORD_ALERT, b"\x02\x28")


def test_session_tickets_are_skipped_even_coalesced() -> None:
    ticket = _handshake_message(4, b"\x00" * 40)
    assert ktls.classify(ktls.RECORD_HANDSHAKE, ticket) is ktls.RecordKind.SKIP
    assert ktls.classify(ktls.RECORD_HANDSHAKE, ticket + ticket) is ktls.RecordKind.SKIP


def test_key_update_fails_even_behind_a_ticket() -> None:
    ticket = _handshake_message(4, b"\x00" * 8)
    with pytest.raises(ktls.KtlsProtocolError, match="KeyUpdate"):
        ktls.classify(ktls.RECORD_HANDSHAKE, ticket + _handshake_message(24, b"\x00"))


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", "empty handshake record"),
        (b"\x04\x00", "truncated handshake message header"),
        (b"\x04\x00\x00\x09abc", "split across records"),
        (_handshake_message(20, b"\x00" * 32), "handshake message 20 after the handshake"),
    ],
)
def test_malformed_or_unexpected_handshake_records_fail(payload: bytes, error: str) -> None:
    with pytest.raises(ktls.KtlsProtocolError, match=error):
        ktls.classify(ktls.RECORD_HANDSHAKE, payload)


def test_unknown_record_type_fails() -> None:
    with pytest.raises(ktls.KtlsProtocolError, match="unknown type 99"):
        ktls.classify(99, b"")


# --- real pairs in a netns of the test's own ----------------------------------


@pytest.fixture
def netns() -> Iterator[Netns]:
    name = f"weirktls-{uuid.uuid4().hex[:8]}"
    ns = create_netns(name)
    try:
        with links(ns) as ns_links:
            ns_links.up("lo")
        yield ns
    finally:
        delete_netns(name)
        assert not (NETNS_DIR / name).exists()


@dataclass(frozen=True)
class Pki:
    client: ssl.SSLContext
    server: ssl.SSLContext


def _pki(tmp_path: Path, version: ssl.TLSVersion, enable_ktls: bool) -> Pki:
    ca = load_or_create_root(tmp_path, "cluster.local", now=datetime.datetime.now(datetime.UTC))
    certs = LocalCaCertificates(ca)
    client = tls.client_context(certs.issue(CLIENT_ID), ca.trust_bundle_pem)
    server = tls.server_context(certs.issue(SERVER_ID), ca.trust_bundle_pem)
    for context in (client, server):
        context.minimum_version = context.maximum_version = version
        if enable_ktls:
            ktls.enable(context)
    return Pki(client, server)


def _tcp_pair(ns: Netns) -> tuple[socket.socket, socket.socket]:
    """(client, accepted) over loopback inside `ns`."""
    with entered(ns), socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        accepted, _ = listener.accept()
    return client, accepted


def _expected_refusal(version: ssl.TLSVersion) -> tuple[str | None, str | None]:
    """(assess reason, handshake decline) this host must give, from the kernel's own files."""
    try:
        ulps = ktls.AVAILABLE_ULP_FILE.read_text().split()
    except FileNotFoundError:
        return "tcp_available_ulp is missing", "took neither direction"
    if "tls" not in ulps:
        return "no 'tls' TCP ULP", "took neither direction"
    if version is ssl.TLSVersion.TLSv1_3 and ssl.OPENSSL_VERSION_INFO[:2] < (3, 2):
        openssl = ssl.OPENSSL_VERSION.split()[1]  # "OpenSSL 3.0.19 27 Jan 2026"
        return f"OpenSSL {openssl} gives TLS 1.3 keys", "took transmit but not receive"
    return None, None


def _peer_id(der: bytes | None) -> str:
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(sans.get_values_for_type(x509.UniformResourceIdentifier)[0])


def test_tls_ulp_claim_matches_the_kernel(netns: Netns) -> None:
    """`unavailable_reason` says 'no tls ULP' exactly when the kernel refuses to attach it."""
    pki = _pki_for_probe()
    client, accepted = _tcp_pair(netns)
    with client, accepted:
        try:
            client.setsockopt(socket.IPPROTO_TCP, ktls.TCP_ULP, b"tls")
            attached = True
        except OSError as e:
            assert e.errno == errno.ENOENT, e
            attached = False
    reason = ktls.unavailable_reason(pki)
    assert attached == (reason is None or "TCP ULP" not in reason), reason
    print(f"\nkTLS on this host: {reason or 'available'}")


def _pki_for_probe() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ktls.enable(context)
    return context


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_pair_moves_bytes_both_ways_and_half_closes(
    netns: Netns, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    pki = _pki(tmp_path, version, enable_ktls=True)
    expected_reason, expected_decline = _expected_refusal(version)
    reason = ktls.unavailable_reason(pki.client)
    if expected_reason is None:
        assert reason is None
        run(lambda: _ktls_exchange(netns, pki, 4 * MIB))
        return
    assert reason is not None and expected_reason in reason, reason
    assert expected_decline is not None
    # The handshake still runs; afterwards the kernel's refusal is read, not guessed.
    declines = run(lambda: _declined_handshakes(netns, pki))
    assert all(expected_decline in d for d in declines), declines
    print(f"\n{version.name}: {reason}; after the handshake: {declines[0]}")
    assert version.name.replace("_", ".") in declines[0]
    # The fallback the caller takes: the memory-BIO path, same bytes, same checks.
    run(lambda: _memory_bio_exchange(netns, pki, 4 * MIB))


async def _declined_handshakes(ns: Netns, pki: Pki) -> list[str]:
    client, accepted = _tcp_pair(ns)
    results = await asyncio.gather(
        ktls.handshake(client, pki.client, server_side=False, timeout=HANDSHAKE_TIMEOUT),
        ktls.handshake(accepted, pki.server, server_side=True, timeout=HANDSHAKE_TIMEOUT),
        return_exceptions=True,
    )
    reasons = []
    for result in results:
        assert isinstance(result, ktls.KtlsDeclinedError), result
        reasons.append(result.reason)
    assert client.fileno() == -1 and accepted.fileno() == -1  # consumed, and closed
    return reasons


async def _ktls_exchange(ns: Netns, pki: Pki, size: int) -> None:
    loop = asyncio.get_running_loop()
    client_raw, accepted_raw = _tcp_pair(ns)
    client, server = await asyncio.gather(
        ktls.handshake(client_raw, pki.client, server_side=False, timeout=HANDSHAKE_TIMEOUT),
        ktls.handshake(accepted_raw, pki.server, server_side=True, timeout=HANDSHAKE_TIMEOUT),
    )
    try:
        assert client.alpn == server.alpn == tls.ALPN_H2
        assert _peer_id(client.peer_certificate_der) == str(SERVER_ID)
        assert _peer_id(server.peer_certificate_der) == str(CLIENT_ID)
        assert client.cipher == server.cipher and "GCM" in client.cipher
        assert ktls.kernel_directions(client.sock) == (True, True)
        # The kernel's own count, in this netns: both ends, both directions, in software.
        stats = _tls_stat(ns)
        assert stats["TlsCurrTxSw"] == stats["TlsCurrRxSw"] == 2, stats
        print(f"\nkTLS both ways: {client.version} {client.cipher}, tls_stat {stats}")
        (up, up_digest), (down, down_digest) = _payload(size, "up"), _payload(size, "down")
        tail, tail_digest = _payload(MIB, "tail")
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            # Both ways at once: neither side's writes may wait on its own reads.
            got_up, got_down, _, _ = await asyncio.gather(
                _ktls_read_exactly(server.sock, size),
                _ktls_read_exactly(client.sock, size),
                loop.sock_sendall(client.sock, up),
                loop.sock_sendall(server.sock, down),
            )
            assert _digest(got_up) == up_digest and _digest(got_down) == down_digest
            # Half-close: the client is done sending, and still hears the server out.
            await ktls.close_write(client.sock)
            await _readable(server.sock)
            # Why a plain Protocol cannot run over kTLS: recv() fails on the
            # close_notify record (EIO) instead of reading end of stream.
            with pytest.raises(OSError) as eio:
                server.sock.recv(1)
            assert eio.value.errno == errno.EIO
            assert await ktls.receive(server.sock) == b""
            await loop.sock_sendall(server.sock, tail)
            await ktls.close_write(server.sock)
            assert _digest(await _ktls_read_to_end(client.sock, len(tail))) == tail_digest
    finally:
        client.sock.close()
        server.sock.close()


def _tls_stat(ns: Netns) -> dict[str, int]:
    with entered(ns):
        text = Path("/proc/thread-self/net/tls_stat").read_text()
    return {name: int(value) for name, value in (line.split() for line in text.splitlines())}


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _ktls_read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    for _ in range(size):  # every turn brings at least a byte
        if got >= size:
            break
        data = await ktls.receive(sock)
        assert data, f"stream ended after {got} of {size} bytes"
        chunks.append(data)
        got += len(data)
    assert got == size
    return b"".join(chunks)


async def _ktls_read_to_end(sock: socket.socket, limit: int) -> bytes:
    data = await _ktls_read_exactly(sock, limit)
    assert await ktls.receive(sock) == b""
    return data


class _Sink(asyncio.Protocol):
    """Hashes what arrives until `expected` bytes did: no buffering in the harness."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.hash = hashlib.sha256()
        self.got = 0
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.hash.update(data)
        self.got += len(data)
        if self.got >= self.expected and not self.done.done():
            self.done.set_result(self.hash.hexdigest())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"lost after {self.got} bytes: {exc}"))


async def _memory_bio_exchange(ns: Netns, pki: Pki, size: int) -> None:
    loop = asyncio.get_running_loop()
    client_raw, accepted_raw = _tcp_pair(ns)
    (up, up_digest), (down, down_digest) = _payload(size, "up"), _payload(size, "down")
    # uvloop's connect_accepted_socket answers its SSLProtocol, not ours: keep ours.
    server, client = _Sink(size), _Sink(size)
    (server_transport, _), (client_transport, _) = await asyncio.gather(
        loop.connect_accepted_socket(
            lambda: server,
            accepted_raw,
            ssl=pki.server,  # kTLS on the context is inert over a memory BIO
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        ),
        loop.create_connection(
            lambda: client,
            sock=client_raw,
            ssl=pki.client,
            server_hostname="",
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        ),
    )
    try:
        for transport, peer in ((server_transport, CLIENT_ID), (client_transport, SERVER_ID)):
            ssl_object = transport.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == tls.ALPN_H2
            assert str(tls.peer_identity(ssl_object)) == str(peer)
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            client_transport.write(up)
            server_transport.write(down)
            got_up, got_down = await asyncio.gather(server.done, client.done)
        assert server.got == client.got == size
        assert got_up == up_digest and got_down == down_digest
    finally:
        client_transport.close()
        server_transport.close()


@functools.cache
def _payload(size: int, name: str) -> tuple[bytes, str]:
    """Random bytes and their digest, made once: not part of what is measured."""
    data = os.urandom(size)
    return data, _digest(data)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_detaching_after_the_handshake_writes_nothing(netns: Netns, tmp_path: Path) -> None:
    """What handshake() relies on: freeing OpenSSL's side of a detached fd sends no byte."""
    pki = _pki(tmp_path, ssl.TLSVersion.TLSv1_3, enable_ktls=False)
    pki.server.num_tickets = 0
    client_raw, accepted_raw = _tcp_pair(netns)
    server_tls: list[ssl.SSLSocket] = []
    serving = threading.Thread(
        target=lambda: server_tls.append(pki.server.wrap_socket(accepted_raw, server_side=True))
    )
    serving.start()
    client_tls = pki.client.wrap_socket(client_raw)
    serving.join(HANDSHAKE_TIMEOUT)
    assert server_tls, "server handshake did not finish"
    plain_server = socket.socket(fileno=server_tls[0].detach())
    plain_client = socket.socket(fileno=client_tls.detach())
    del client_tls  # the SSL object is freed here (SSL_free)
    with plain_client, plain_server:
        assert plain_client.fileno() >= 0
        with pytest.raises(BlockingIOError):
            plain_server.recv(1, socket.MSG_DONTWAIT)
        # The fd is still the live connection: bytes written now arrive as they are.
        plain_client.sendall(b"after")
        assert plain_server.recv(5) == b"after"


def test_envoy_hbone_server_sends_session_tickets(netns: Netns, tmp_path: Path) -> None:
    """Why receive() skips NewSessionTicket: Envoy (BoringSSL) sends them after a TLS 1.3
    handshake even though its config never mentions resumption."""
    ca = load_or_create_root(tmp_path, "cluster.local", now=datetime.datetime.now(datetime.UTC))
    certs = LocalCaCertificates(ca)
    svid = write_svid(tmp_path / "svid", "server", certs.issue(SERVER_ID), ca.trust_bundle_pem)
    config = envoy_hbone_server(
        listen_address="127.0.0.1", app_address="127.0.0.1", app_port=9, svid=svid
    )
    envoy = EnvoyProcess(netns, config, tmp_path / "envoy", "server")
    try:
        envoy.wait_listening("127.0.0.1", INBOUND_TUNNEL_PORT)
        context = tls.client_context(certs.issue(CLIENT_ID), ca.trust_bundle_pem)
        with entered(netns):
            raw = socket.create_connection(("127.0.0.1", INBOUND_TUNNEL_PORT), timeout=5)
        with context.wrap_socket(raw) as client:
            assert client.version() == "TLSv1.3" and client.session is not None
            assert not client.session.has_ticket
            # Envoy answers the HTTP/2 preface with SETTINGS, sent after its tickets:
            # reading that reads them.
            client.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            assert client.recv(9)
            assert client.session.has_ticket
    finally:
        envoy.close()


# --- measured, not asserted: printed for the report ----------------------------


def test_throughput_figures(netns: Netns, tmp_path: Path) -> None:
    """MiB/s and CPU ms per MiB, both ends on one core, for each path this host has."""
    size = 64 * MIB
    cpu = sorted(os.sched_getaffinity(0))[-1]
    home = os.sched_getaffinity(0)
    lines = []
    os.sched_setaffinity(0, {cpu})
    try:
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            memory = _pki(tmp_path / f"m{version.name}", version, enable_ktls=False)
            lines.append(_measure(f"memory BIO {version.name}", size, memory, netns, kernel=False))
            kernel = _pki(tmp_path / f"k{version.name}", version, enable_ktls=True)
            if ktls.unavailable_reason(kernel.client) is None:
                lines.append(_measure(f"kTLS {version.name}", size, kernel, netns, kernel=True))
            else:
                lines.append(f"kTLS {version.name}: {ktls.unavailable_reason(kernel.client)}")
    finally:
        os.sched_setaffinity(0, home)
        _payload.cache_clear()
    print(f"\n{size // MIB} MiB each way, pinned to CPU {cpu}:\n" + "\n".join(lines))


def _measure(label: str, size: int, pki: Pki, ns: Netns, *, kernel: bool) -> str:
    exchange = _ktls_exchange if kernel else _memory_bio_exchange
    _payload(size, "up"), _payload(size, "down"), _payload(MIB, "tail")
    wall, cpu = time.perf_counter(), time.process_time()
    run(lambda: exchange(ns, pki, size))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    moved = 2 * size / MIB
    return f"{label}: {moved / wall:.0f} MiB/s, {1000 * cpu / moved:.2f} CPU ms/MiB"
