"""Kernel TLS (kTLS) for mTLS connections, where the kernel and OpenSSL allow it.

The memory-BIO TLS that uvloop runs can never hand keys to the kernel, since
OpenSSL never owns the socket. Here OpenSSL does: the handshake runs on a real
`ssl.SSLSocket` over the non-blocking TCP socket, with SSL_OP_ENABLE_KTLS on
the context, driven by the event loop (readiness futures, no thread). If
OpenSSL then installed the traffic keys in the kernel for BOTH directions, the
fd is detached from OpenSSL and handed back as a plain socket: every send is
encrypted by the kernel, every recv decrypted by it.

Decide before the handshake, with `unavailable_reason()`: a connection that
finished its handshake in OpenSSL cannot move to uvloop's memory BIO, so a
post-handshake refusal (`KtlsDeclinedError`) costs the connection. What can
make the kernel refuse:

- no `tls` TCP ULP (CONFIG_TLS off, or the module not loaded): nothing happens;
- OpenSSL before 3.2 installs TLS 1.3 keys for transmit only (3.0's
  tls13_change_cipher_state skips kTLS unless SSL3_CC_WRITE; receive came with
  3.2's record layer); TLS 1.2 goes both ways from 3.0;
- a cipher the kernel does not offer (ChaCha20-Poly1305 without its module).

On a kTLS socket, `recv()` only returns application data. Any other record
makes it fail with EIO (MSG_CTRUNC on the record-type cmsg it had no room
for), and the record stays queued. A peer sends such records: close_notify
before its FIN (OpenSSL, BoringSSL, Envoy all do), NewSessionTicket after a
TLS 1.3 server handshake (Envoy's BoringSSL sends them unless stateless
resumption is disabled; OpenSSL servers send 2 unless num_tickets is 0), and
KeyUpdate whenever it likes. So a plain asyncio.Protocol over the socket
(uvloop's recv) would see a peer's graceful close as an I/O error. The data
path must read with `receive()`, which reads the record type: data is
returned, close_notify is end of stream, session tickets are skipped (this
side never resumes), and a KeyUpdate or any other alert fails the connection
(the new receive key would come from a traffic secret OpenSSL does not give
out). `close_write()` sends close_notify, then the FIN.

Detaching loses nothing: without read-ahead (Python never sets it) OpenSSL
reads one record at a time, so no application data waits inside it. It is
quiet too: SSL_free sends nothing (only SSL_shutdown writes close_notify),
and Python's SSLSocket gives OpenSSL a BIO_NOCLOSE socket BIO, so the fd and
its kernel TLS state outlive the SSL object.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final

# linux/tls.h, linux/tcp.h; Python 3.11's socket module names none of them.
SOL_TLS: Final = 282
TLS_TX: Final = 1
TLS_RX: Final = 2
TLS_SET_RECORD_TYPE: Final = 1  # cmsg on send
TLS_GET_RECORD_TYPE: Final = 2  # cmsg on recv
TCP_ULP: Final = 31
# OpenSSL's SSL_OP_ENABLE_KTLS (ssl.OP_ENABLE_KTLS from Python 3.12 on).
SSL_OP_ENABLE_KTLS: Final = 1 << 3
# OpenSSL gives TLS 1.3 receive keys to the kernel from this version on.
OPENSSL_TLS13_RX: Final = (3, 2)
AVAILABLE_ULP_FILE: Final = Path("/proc/sys/net/ipv4/tcp_available_ulp")

# TLS record content types (RFC 8446 5.1) and the messages that matter here.
RECORD_ALERT: Final = 21
RECORD_HANDSHAKE: Final = 22
RECORD_DATA: Final = 23
_ALERT_CLOSE_NOTIFY: Final = 0
_HANDSHAKE_NEW_SESSION_TICKET: Final = 4
_HANDSHAKE_KEY_UPDATE: Final = 24
_CLOSE_NOTIFY: Final = bytes([1, _ALERT_CLOSE_NOTIFY])  # level warning, as OpenSSL sends it

# Readiness waits per handshake: a TLS 1.3 handshake needs a handful; this
# only stops a peer that trickles bytes from keeping us inside the timeout.
MAX_HANDSHAKE_STEPS: Final = 64
# Control records skipped in one receive() before giving up on the peer.
MAX_SKIPPED_RECORDS: Final = 16
# One receive() may return several data records: the kernel joins records of
# the same type in one recvmsg, and each call costs a Python round trip.
RECEIVE_BYTES: Final = 256 * 1024


class KtlsDeclinedError(Exception):
    """The kernel did not take both directions; the connection was closed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KtlsProtocolError(Exception):
    """The peer sent a record a kTLS socket cannot follow (KeyUpdate, a fatal alert)."""


@dataclass(frozen=True)
class KtlsSocket:
    """A TCP socket whose TLS records the kernel seals and opens, and what the handshake said."""

    sock: socket.socket
    alpn: str | None
    peer_certificate_der: bytes | None  # verified by OpenSSL against the context's roots
    cipher: str
    version: str


class RecordKind(Enum):
    DATA = "data"
    END = "end"  # close_notify
    SKIP = "skip"  # session tickets: nothing for this side to do


def enable(context: ssl.SSLContext) -> None:
    """Ask OpenSSL to hand the keys of this context's connections to the kernel.

    A server context also stops issuing TLS 1.3 session tickets: mesh clients
    never resume, and on a kTLS client each ticket is a record to skip. It
    also keeps the server's handshake from writing after the client is done,
    so a client that declines kTLS and closes does not fail the server's.
    """
    context.options |= SSL_OP_ENABLE_KTLS
    if context.protocol is ssl.PROTOCOL_TLS_SERVER:
        context.num_tickets = 0


def assess(
    *,
    available_ulps: str | None,
    openssl_version: tuple[int, ...],
    ktls_option: bool,
    tls13: bool,
) -> str | None:
    """Why a connection under these conditions cannot get kTLS both ways; None if it can."""
    if not ktls_option:
        return "kTLS is not enabled on this TLS context (SSL_OP_ENABLE_KTLS)"
    if available_ulps is None:
        return f"the kernel has no TCP upper-layer protocols ({AVAILABLE_ULP_FILE} is missing)"
    if "tls" not in available_ulps.split():
        return (
            f"the kernel offers no 'tls' TCP ULP (available: {available_ulps.strip() or 'none'}):"
            " CONFIG_TLS is off or the tls module is not loaded"
        )
    if tls13 and openssl_version[:2] < OPENSSL_TLS13_RX:
        have = ".".join(str(part) for part in openssl_version[:3])
        return (
            f"OpenSSL {have} gives TLS 1.3 keys to the kernel for transmit only;"
            f" receive needs OpenSSL {'.'.join(map(str, OPENSSL_TLS13_RX))}"
        )
    return None


def unavailable_reason(context: ssl.SSLContext) -> str | None:
    """`assess` for this host, this OpenSSL and `context`: check once, log the reason once."""
    try:
        ulps: str | None = AVAILABLE_ULP_FILE.read_text()
    except FileNotFoundError:
        ulps = None
    return assess(
        available_ulps=ulps,
        openssl_version=_openssl_version(),
        ktls_option=bool(context.options & SSL_OP_ENABLE_KTLS),
        tls13=context.maximum_version in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3),
    )


def _openssl_version() -> tuple[int, int, int]:
    major, minor, fix, patch, _ = ssl.OPENSSL_VERSION_INFO
    # From 3.0 the number is MNN00PP0S: the third field is always 0, the patch is the fourth.
    return (major, minor, patch) if major >= 3 else (major, minor, fix)


def kernel_directions(sock: socket.socket) -> tuple[bool, bool]:
    """Whether the kernel holds keys for (transmit, receive) on `sock`."""
    return _direction(sock, TLS_TX), _direction(sock, TLS_RX)


def _direction(sock: socket.socket, direction: int) -> bool:
    try:
        # A 4-byte buffer gets the version and cipher only: the keys stay in the kernel.
        sock.getsockopt(SOL_TLS, direction, 4)
    except OSError as e:
        # EOPNOTSUPP/ENOPROTOOPT: no tls ULP on the socket; EBUSY: ULP, no keys this way.
        if e.errno in (errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EBUSY):
            return False
        raise
    return True


def _decline_reason(tx: bool, rx: bool, version: str, cipher: str) -> str:
    if tx:
        return f"the kernel took transmit but not receive ({version}, {cipher})"
    if rx:
        return f"the kernel took receive but not transmit ({version}, {cipher})"
    return f"the kernel took neither direction ({version}, {cipher})"


async def handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    timeout: float,
) -> KtlsSocket:
    """Run the TLS handshake on connected TCP `sock` and hand it to the kernel.

    `sock` is consumed: it comes back inside the KtlsSocket, or is closed when
    this raises (KtlsDeclinedError, TimeoutError, ssl.SSLError, OSError). The
    caller checks the peer's identity and ALPN from the result, as for a
    memory-BIO connection.
    """
    if not context.options & SSL_OP_ENABLE_KTLS:
        sock.close()
        raise ValueError("the context does not enable kTLS; call ktls.enable(context) first")
    sock.setblocking(False)
    tls = context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    try:
        async with asyncio.timeout(timeout):
            await _drive_handshake(tls)
        tx, rx = kernel_directions(tls)
        cipher = (tls.cipher() or ("unknown",))[0]
        alpn = tls.selected_alpn_protocol()
        peer_der = tls.getpeercert(binary_form=True)
        version = tls.version() or "unknown"
    except BaseException:
        tls.close()
        raise
    if not (tx and rx):
        tls.close()
        raise KtlsDeclinedError(_decline_reason(tx, rx, version, cipher))
    # Last, so nothing can fail between OpenSSL letting go of the fd and the caller owning it.
    plain = socket.socket(fileno=tls.detach())
    plain.setblocking(False)
    return KtlsSocket(plain, alpn, peer_der, cipher, version)


async def _drive_handshake(tls: ssl.SSLSocket) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(MAX_HANDSHAKE_STEPS):
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            await _ready(loop.add_reader, loop.remove_reader, tls.fileno())
        except ssl.SSLWantWriteError:
            await _ready(loop.add_writer, loop.remove_writer, tls.fileno())
        else:
            return
    raise ssl.SSLError(f"TLS handshake did not finish in {MAX_HANDSHAKE_STEPS} steps")


async def _ready(add: Callable[..., object], remove: Callable[[int], object], fd: int) -> None:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    add(fd, wake)
    try:
        await done
    finally:
        remove(fd)


def classify(record_type: int, payload: bytes) -> RecordKind:
    """What a record read from a kTLS socket means for the stream."""
    if record_type == RECORD_DATA:
        return RecordKind.DATA
    if record_type == RECORD_ALERT:
        if len(payload) == 2 and payload[1] == _ALERT_CLOSE_NOTIFY:
            return RecordKind.END
        raise KtlsProtocolError(f"peer sent TLS alert {payload.hex() or '(empty)'}")
    if record_type == RECORD_HANDSHAKE:
        for message_type in _handshake_messages(payload):
            if message_type == _HANDSHAKE_KEY_UPDATE:
                raise KtlsProtocolError(
                    "peer sent KeyUpdate: the kernel's receive key cannot follow it"
                )
            if message_type != _HANDSHAKE_NEW_SESSION_TICKET:
                raise KtlsProtocolError(
                    f"peer sent handshake message {message_type} after the handshake"
                )
        return RecordKind.SKIP
    raise KtlsProtocolError(f"peer sent a record of unknown type {record_type}")


def _handshake_messages(payload: bytes) -> list[int]:
    """Message types in a handshake record; messages must not span records."""
    types: list[int] = []
    offset = 0
    while offset < len(payload):  # each turn consumes at least the 4-byte header
        if len(payload) - offset < 4:
            raise KtlsProtocolError("truncated handshake message header")
        message_type = payload[offset]
        (length,) = struct.unpack_from("!I", b"\0" + payload[offset + 1 : offset + 4])
        offset += 4 + length
        if offset > len(payload):
            raise KtlsProtocolError("handshake message split across records")
        types.append(message_type)
    if not types:
        raise KtlsProtocolError("empty handshake record")
    return types


def read_record(sock: socket.socket, max_bytes: int = RECEIVE_BYTES) -> tuple[int, bytes]:
    """One record's (type, plaintext); BlockingIOError if none is ready, (DATA, b"") on FIN."""
    data, ancdata, flags, _ = sock.recvmsg(max_bytes, socket.CMSG_SPACE(1))
    if flags & socket.MSG_CTRUNC:
        raise KtlsProtocolError("record type cmsg truncated")
    for level, kind, value in ancdata:
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and len(value) == 1:
            return value[0], data
    return RECORD_DATA, data


async def receive(sock: socket.socket, max_bytes: int = RECEIVE_BYTES) -> bytes:
    """The next application data; b"" at the peer's close_notify or FIN.

    No deadline of its own: the caller bounds idle time, as for any read.
    """
    loop = asyncio.get_running_loop()
    # Each turn either waits for readiness or consumes a record: a peer can
    # make us skip only so many tickets before sending data.
    for _ in range(2 * MAX_SKIPPED_RECORDS + 2):
        try:
            record_type, payload = read_record(sock, max_bytes)
        except BlockingIOError:
            await _ready(loop.add_reader, loop.remove_reader, sock.fileno())
            continue
        kind = classify(record_type, payload)
        if kind is RecordKind.DATA:
            return payload
        if kind is RecordKind.END:
            return b""
    raise KtlsProtocolError("peer sent too many control records in a row")


def send_close_notify(sock: socket.socket) -> None:
    """Seal a close_notify alert (the kernel encrypts it as an alert record)."""
    record_type = bytes([RECORD_ALERT])
    sock.sendmsg([_CLOSE_NOTIFY], [(SOL_TLS, TLS_SET_RECORD_TYPE, record_type)])


async def close_write(sock: socket.socket) -> None:
    """Half-close: close_notify, then FIN; the peer may go on sending (TLS 1.3 allows it)."""
    loop = asyncio.get_running_loop()
    try:
        send_close_notify(sock)
    except BlockingIOError:
        await _ready(loop.add_writer, loop.remove_writer, sock.fileno())
        send_close_notify(sock)
    sock.shutdown(socket.SHUT_WR)
