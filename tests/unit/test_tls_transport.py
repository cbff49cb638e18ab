"""tls_transport: handshakes driven by the loop, and the transport HBONE runs on (loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import uvloop

from controlplane.ca import load_or_create_root
from node_agent import openssl
from node_agent.proxy import tls_transport
from node_agent.proxy.identity import WorkloadCertificate
from node_agent.proxy.tls import ALPN_H2, client_context, peer_identity, server_context
from testbed.proxy_fakes import LocalCaCertificates
from weir_common.mesh import SpiffeId

LOCAL = "127.0.0.1"
SERVER_ID = SpiffeId("cluster.local", "default", "server")
CLIENT_ID = SpiffeId("cluster.local", "default", "client")


@pytest.fixture
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = load_or_create_root(
        tmp_path_factory.mktemp("ca"), "cluster.local", now=datetime.datetime.now(datetime.UTC)
    )
    issuer = LocalCaCertificates(ca)
    server: WorkloadCertificate = issuer.issue(SERVER_ID)
    client: WorkloadCertificate = issuer.issue(CLIENT_ID)
    bundle = ca.trust_bundle_pem
    return server_context(server, bundle), client_context(client, bundle)


class Collector(asyncio.Protocol):
    """Keeps what arrives; can echo it; records every callback."""

    def __init__(self, *, echo: bool = False) -> None:
        self.echo = echo
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.eof = False
        self.paused = 0
        self.resumed = 0
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo and self.transport is not None:
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@contextlib.asynccontextmanager
async def tls_pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    server_protocol: Callable[[], asyncio.Protocol],
    client_protocol: Callable[[], asyncio.Protocol],
) -> AsyncIterator[tuple[tls_transport.TlsTransport, tls_transport.TlsTransport]]:
    server_ctx, client_ctx = contexts
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    client_sock = socket.socket()
    client_sock.setblocking(False)
    try:
        accepted, _ = await asyncio.gather(
            loop.sock_accept(listener), loop.sock_connect(client_sock, listener.getsockname())
        )
        server_sock = accepted[0]
        server_sock.setblocking(False)
        server_tls, client_tls = await asyncio.gather(
            tls_transport.handshake(server_sock, server_ctx, server_side=True, timeout=5),
            tls_transport.handshake(client_sock, client_ctx, server_side=False, timeout=5),
        )
        assert server_tls.selected_alpn_protocol() == ALPN_H2
        assert peer_identity(server_tls) == CLIENT_ID
        assert peer_identity(client_tls) == SERVER_ID
        server = tls_transport.TlsTransport(server_tls, server_protocol())
        client = tls_transport.TlsTransport(client_tls, client_protocol())
        try:
            yield server, client
        finally:
            server.abort()
            client.abort()
    finally:
        listener.close()
        client_sock.close()


async def handshaken_socketpair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    *,
    buffer_bytes: int = 0,
    client_first: Callable[[ssl.SSLSocket], object] | None = None,
) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(server, client), handshaken over a socketpair; `client_first` runs on the
    client as soon as its side is done, before the server's side completes."""
    server_ctx, client_ctx = contexts
    a, b = socket.socketpair()
    if buffer_bytes:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
    a.setblocking(False)
    b.setblocking(False)
    server = asyncio.create_task(
        tls_transport.handshake(a, server_ctx, server_side=True, timeout=5)
    )
    client = await tls_transport.handshake(b, client_ctx, server_side=False, timeout=5)
    if client_first is not None:
        client_first(client)
    return await server, client


def run(coro: object) -> None:
    uvloop.run(coro)  # type: ignore[arg-type]


def test_megabytes_both_ways_arrive_whole_and_in_order_with_backpressure(contexts) -> None:
    payload = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)

    async def main() -> None:
        async with tls_pair(contexts, lambda: Collector(echo=True), Collector) as (_, client):
            protocol = client.get_protocol()
            assert isinstance(protocol, Collector)
            for start in range(0, len(payload), 1 << 20):  # faster than the echo can answer
                client.write(payload[start : start + (1 << 20)])
            assert client.get_write_buffer_size() > 0
            async with asyncio.timeout(30):
                while len(protocol.data) < len(payload):
                    await asyncio.sleep(0.01)
            assert protocol.data == payload
            # The writer was held back above the high-water mark and let go below it.
            assert protocol.paused >= 1 and protocol.resumed == protocol.paused
            assert client.get_write_buffer_size() == 0

    run(main())


def read_to_the_end(listener: socket.socket, context: ssl.SSLContext) -> bytes | Exception:
    """A blocking TLS peer that tells a close_notify (b"" at the end) from a bare FIN (error)."""
    # Python ignores an EOF without close_notify by default; this peer must not.
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    conn, _ = listener.accept()
    with context.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False) as tls:
        tls.settimeout(10)
        got = bytearray()
        try:
            while data := tls.recv(65536):
                got += data
        except ssl.SSLError as e:
            return e
        return bytes(got)


async def client_to_blocking_peer(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    end: Callable[[tls_transport.TlsTransport], None],
) -> tuple[bytes | Exception, Exception | None]:
    server_ctx, client_ctx = contexts
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen()
    peer = asyncio.create_task(asyncio.to_thread(read_to_the_end, listener, server_ctx))
    try:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, listener.getsockname())
        tls = await tls_transport.handshake(sock, client_ctx, server_side=False, timeout=5)
        protocol = Collector()
        transport = tls_transport.TlsTransport(tls, protocol)
        transport.write(b"last words " * 100_000)  # more than the socket takes at once
        end(transport)
        assert transport.is_closing()
        transport.write(b"ignored after the end")
        async with asyncio.timeout(10):
            return await peer, await protocol.lost
    finally:
        listener.close()


def test_close_sends_what_is_queued_then_close_notify(contexts) -> None:
    async def main() -> None:
        received, lost = await client_to_blocking_peer(contexts, lambda t: t.close())
        assert received == b"last words " * 100_000
        assert lost is None

    run(main())


def test_abort_drops_what_is_queued_and_sends_no_close_notify(contexts) -> None:
    async def main() -> None:
        received, lost = await client_to_blocking_peer(contexts, lambda t: t.abort())
        assert isinstance(received, ssl.SSLError), received
        assert "EOF" in str(received)  # the data ended without close_notify
        assert lost is None

    run(main())


def test_the_peers_close_notify_is_end_of_stream_then_lost(contexts) -> None:
    async def main() -> None:
        async with tls_pair(contexts, Collector, Collector) as (server, client):
            server_side = server.get_protocol()
            assert isinstance(server_side, Collector)
            client.write(b"bye")
            client.close()
            async with asyncio.timeout(10):
                assert await server_side.lost is None
            assert server_side.eof and server_side.data == b"bye"

    run(main())


def test_handshake_with_a_peer_that_is_not_tls_fails_and_closes(contexts) -> None:
    server_ctx, _ = contexts

    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ssl.SSLError):
            await tls_transport.handshake(a, server_ctx, server_side=True, timeout=5)
        assert a.fileno() == -1  # taken over, and closed with the failure
        b.close()

    run(main())


def test_handshake_with_a_silent_peer_times_out(contexts) -> None:
    server_ctx, _ = contexts

    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        with pytest.raises(TimeoutError):
            await tls_transport.handshake(a, server_ctx, server_side=True, timeout=0.2)
        b.close()

    run(main())


def test_read_ahead_is_on_for_the_proxys_contexts(contexts) -> None:
    for context in contexts:
        assert tls_transport.read_ahead(context) is None
        libssl = openssl.libssl()
        address = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        assert libssl.SSL_CTX_ctrl(address, 40, 0, None) == 1  # SSL_CTRL_GET_READ_AHEAD


def test_records_read_ahead_during_the_handshake_are_delivered(contexts) -> None:
    """The client writes in the same breath as its last handshake message: the
    server's OpenSSL reads both at once (read-ahead), so the kernel has nothing
    left to report, and the bytes must still reach the protocol."""

    async def main() -> None:
        # No await between the handshake's end and the send: beside the Finished message.
        server_tls, client_tls = await handshaken_socketpair(
            contexts, client_first=lambda client: client.send(b"first words")
        )
        protocol = Collector()
        transport = tls_transport.TlsTransport(server_tls, protocol)
        try:
            async with asyncio.timeout(5):
                while protocol.data != b"first words":
                    await asyncio.sleep(0.01)
        finally:
            transport.abort()
            client_tls.close()

    run(main())


@pytest.fixture(params=["has_pending", "until_want_read"])
def read_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """With the SSL object reached (this Python: reads end on SSL_has_pending, writes
    go through the buffer), and without (a Python whose layout is not the known one:
    reads end on SSLWantReadError, OpenSSL writes each record itself)."""
    if request.param == "until_want_read":
        # The layout check's verdict, not _ssl_address itself: the compiled module
        # calls its own functions directly, past a module attribute set here.
        monkeypatch.setattr(tls_transport._LayoutCheck, "confirmed", False)
    return str(request.param)


def test_this_python_reads_with_has_pending_and_writes_through_the_buffer(contexts) -> None:
    async def main() -> None:
        async with tls_pair(contexts, Collector, Collector) as (server, client):
            assert tls_transport._LayoutCheck.confirmed is True
            for transport in (server, client):
                assert transport._has_pending is not None and transport._buffer is not None
            assert server._has_pending() == 0  # nothing sent yet

    run(main())


def write_syscalls() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


@pytest.mark.parametrize("size", [1, 1 << 20])
def test_records_leave_in_few_writes_and_a_small_write_leaves_at_once(contexts, size) -> None:
    """1 MiB is 64 records: OpenSSL alone writes each with its own syscall; through
    the 64 KiB buffer they leave in about 16. One byte must not wait in the buffer."""
    payload = bytes(range(256)) * (size // 256) if size > 1 else b"!"

    async def main() -> None:
        async with tls_pair(contexts, Collector, Collector) as (server, client):
            protocol = server.get_protocol()
            assert isinstance(protocol, Collector)
            before = write_syscalls()
            client.write(payload)
            async with asyncio.timeout(10):
                while len(protocol.data) < len(payload):
                    await asyncio.sleep(0.001)
            writes = write_syscalls() - before
            assert protocol.data == payload
            assert writes <= (1 if size == 1 else 24), writes

    run(main())


def test_a_burst_of_small_records_read_ahead_at_once_is_delivered_whole(
    contexts, read_mode: str
) -> None:
    """300 records land in the kernel before the server reads: OpenSSL takes them
    all in one read-ahead, so only OpenSSL, not the kernel, knows the rest is
    there. Stopping when the record at hand is done would strand them."""
    records = [bytes([i % 251]) * 100 for i in range(300)]

    async def main() -> None:
        # Room in the socket buffers for the whole burst.
        server_tls, client_tls = await handshaken_socketpair(contexts, buffer_bytes=4 << 20)
        for record in records:  # each send is one record
            client_tls.send(record)
        protocol = Collector()
        transport = tls_transport.TlsTransport(server_tls, protocol)
        assert (transport._has_pending is None) == (read_mode == "until_want_read")
        try:
            async with asyncio.timeout(5):
                while len(protocol.data) < 30_000:
                    await asyncio.sleep(0.01)
            assert protocol.data == b"".join(records)
        finally:
            transport.abort()
            client_tls.close()

    run(main())


def test_megabytes_arrive_whole_either_way_reads_end(contexts, read_mode: str) -> None:
    payload = hashlib.sha256(b"other seed").digest() * (2 * 1024 * 1024 // 32)

    async def main() -> None:
        async with tls_pair(contexts, lambda: Collector(echo=True), Collector) as (_, client):
            protocol = client.get_protocol()
            assert isinstance(protocol, Collector)
            client.write(payload)
            async with asyncio.timeout(30):
                while len(protocol.data) < len(payload):
                    await asyncio.sleep(0.01)
            assert protocol.data == payload

    run(main())


async def serve_until_lost(server_tls: ssl.SSLSocket) -> tuple[bytes, bool, Exception | None]:
    """A transport over `server_tls` until the connection is lost: what arrived,
    whether an EOF came, and what connection_lost was given."""
    protocol = Collector()
    transport = tls_transport.TlsTransport(server_tls, protocol)
    try:
        async with asyncio.timeout(5):
            lost = await protocol.lost
        return bytes(protocol.data), protocol.eof, lost
    finally:
        transport.abort()


def test_a_peer_gone_without_close_notify_is_an_eof(contexts, read_mode: str) -> None:
    """What SSLSocket's suppress_ragged_eofs made of it before reads went to OpenSSL directly."""

    async def main() -> None:
        server_tls, client_tls = await handshaken_socketpair(contexts)
        client_tls.send(b"last words")
        client_tls.shutdown(socket.SHUT_WR)  # the FIN alone: no close_notify
        try:
            assert await serve_until_lost(server_tls) == (b"last words", True, None)
        finally:
            client_tls.close()

    run(main())


def test_a_forged_record_ends_the_connection_with_openssls_reason(contexts, read_mode: str) -> None:
    """An application-data record no key of this session sealed: what came before it
    is delivered, then the connection is lost with the SSLError OpenSSL reports."""

    async def main() -> None:
        server_tls, client_tls = await handshaken_socketpair(contexts)
        client_tls.send(b"good words")
        with socket.socket(fileno=os.dup(client_tls.fileno())) as raw:
            raw.setblocking(True)
            raw.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))
        try:
            data, _, lost = await serve_until_lost(server_tls)
        finally:
            client_tls.close()
        assert data == b"good words"
        assert isinstance(lost, ssl.SSLError), lost
        # OpenSSL queues two reasons: C reports the first ("decryption failed or
        # bad record mac"), the ssl module the last ("record layer failure").
        assert "record" in str(lost), lost

    run(main())


def test_a_reset_ends_the_connection_with_the_sockets_error(contexts, read_mode: str) -> None:
    """A Unix socket closed with bytes it never read resets its peer: the peer's
    reads return what was sent before, then ECONNRESET. The kernel reports the
    error with the data's event, on which libuv stops watching the socket: the
    error must be read in that same event, or the connection hangs."""

    async def main() -> None:
        server_tls, client_tls = await handshaken_socketpair(contexts)
        server_tls.send(b"never read")
        client_tls.send(b"last words")
        client_tls.close()
        data, eof, lost = await serve_until_lost(server_tls)
        assert data == b"last words"
        if read_mode == "has_pending":
            assert isinstance(lost, ConnectionResetError), lost
        else:
            # Python 3.11's ssl module calls SSL_read_ex, whose 0 it reads as an
            # EOF whatever errno says (SSLEOFError).
            assert (lost, eof) == (None, True)

    run(main())


def test_pieces_go_to_openssl_one_by_one_and_leave_in_one_write(contexts) -> None:
    """writelines hands each piece to OpenSSL as it is and writes the socket once at
    the end: three small pieces are one syscall, not three."""

    async def main() -> None:
        async with tls_pair(contexts, Collector, Collector) as (server, client):
            protocol = server.get_protocol()
            assert isinstance(protocol, Collector)
            before = write_syscalls()
            client.writelines([b"frame header", b"", b"payload", b"window update"])
            writes = write_syscalls() - before
            async with asyncio.timeout(10):
                while len(protocol.data) < 32:
                    await asyncio.sleep(0.001)
            assert protocol.data == b"frame headerpayloadwindow update"
            assert writes == 1

    run(main())


def test_pieces_queued_behind_a_full_socket_arrive_whole_and_in_order(contexts) -> None:
    """HTTP/2 frames as the codec gives them (a small header, then a large payload
    not copied behind it), faster than the peer reads: what waits is sent in order,
    small pieces joined, large ones as they are."""
    payloads = [bytes([i]) * (100_000 + i) for i in range(40)]  # 4 MB
    expected = b"".join(b"H%02d" % i + p for i, p in enumerate(payloads))

    async def main() -> None:
        async with tls_pair(contexts, Collector, Collector) as (server, client):
            protocol = server.get_protocol()
            assert isinstance(protocol, Collector)
            server.pause_reading()
            for i, payload in enumerate(payloads):
                client.writelines([b"H%02d" % i, payload])
            assert client.get_write_buffer_size() > 0  # the socket is full: pieces wait
            server.resume_reading()
            async with asyncio.timeout(30):
                while len(protocol.data) < len(expected):
                    await asyncio.sleep(0.01)
            assert protocol.data == expected
            assert client.get_write_buffer_size() == 0

    run(main())


def test_aes_128_gcm_is_chosen_and_a_peer_without_it_is_still_served(contexts) -> None:
    server_ctx, client_ctx = contexts
    names = [c["name"] for c in client_ctx.get_ciphers()]
    assert names[:3] == tls_transport.TLS13_SUITES.split(":")

    async def negotiated() -> str:
        async with tls_pair((server_ctx, client_ctx), Collector, Collector) as (server, client):
            assert server.get_extra_info("cipher")[0] == client.get_extra_info("cipher")[0]
            return str(client.get_extra_info("cipher")[0])

    async def main() -> None:
        assert await negotiated() == "TLS_AES_128_GCM_SHA256"
        # A client offering only AES-256-GCM (set as order_tls13_suites does).
        libssl = openssl.libssl()
        address = ctypes.c_void_p.from_address(id(client_ctx) + object.__basicsize__).value
        assert libssl.SSL_CTX_set_ciphersuites(address, b"TLS_AES_256_GCM_SHA384") == 1
        assert await negotiated() == "TLS_AES_256_GCM_SHA384"

    run(main())


class Lent(Collector):
    """Records the type of what it is given and overwrites a lent view on return,
    as the next read would."""

    def __init__(self) -> None:
        super().__init__()
        self.types: set[type] = set()

    def data_received(self, data: bytes) -> None:
        self.types.add(type(data))
        self.data += data
        if isinstance(data, memoryview):
            data[:] = b"\0" * len(data)


@pytest.mark.parametrize("lend", [True, False])
def test_reads_are_lent_only_when_asked(contexts, lend: bool) -> None:
    payload = bytes(range(1, 256)) * 4000

    async def main() -> None:
        server_tls, client_tls = await handshaken_socketpair(contexts)
        protocol = Lent()
        transport = tls_transport.TlsTransport(server_tls, protocol, lend_reads=lend)
        sender = tls_transport.TlsTransport(client_tls, Collector())
        try:
            sender.write(payload)
            async with asyncio.timeout(10):
                while len(protocol.data) < len(payload):
                    await asyncio.sleep(0.01)
            assert protocol.data == payload  # what it copied in time is intact
            assert protocol.types == ({memoryview} if lend else {bytes})
        finally:
            transport.abort()
            sender.abort()

    run(main())
