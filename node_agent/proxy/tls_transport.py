"""TLS where OpenSSL owns the socket: the handshake and the transport HBONE runs on.

uvloop's TLS runs OpenSSL over memory BIOs: every read is copied into a BIO
and pulled out again through Python-level calls, every write the same way
back. Here the event loop only says when the socket is ready; an
`ssl.SSLSocket` reads, decrypts, encrypts and writes in one call each. In a
1 KiB ping-pong this costs about 30-40% less CPU per exchange than uvloop's
SSL transport (bench/proxy_hbone.py measures the proxy as a whole).

A socket OpenSSL owns is also one the kernel can take over: with
SSL_OP_ENABLE_KTLS on the context, OpenSSL hands the record layer to the
kernel (kTLS) wherever the kernel and OpenSSL allow it, and nothing here
changes.

Python never enables OpenSSL's read-ahead, so OpenSSL would read each record
with two syscalls (its 5-byte header, then its body): 128 per MiB. `read_ahead`
turns it on, with a READ_AHEAD (64 KiB) buffer, so one syscall takes up to four
records. Not more: before each record OpenSSL moves whatever it holds beyond
that record to the front of its buffer, so the bytes it copies grow with the
square of the records one read brings. bench/tls_read_ahead.py measures a
reader's CPU per MiB: in interleaved runs, 0.27-0.29 ms with 256 KiB against
0.21-0.26 with 64, and 0.26-0.30 without read-ahead.

OpenSSL may then hold whole records the kernel no longer reports, so a read
event is served until OpenSSL holds nothing more, processed or not
(SSL_has_pending), never stopped early on `pending()`, which counts only the
record at hand. Asking SSL_has_pending costs half a microsecond; finding out
by reading once more costs a syscall and an SSLWantReadError, about 6 µs on
a 2-core VM, on every read event. Where this Python's layout does not let us
reach the SSL object, reads go on until SSLWantReadError instead.

Where the SSL object is reachable, a read event's records are read by one
call into C (_tls_reads.c: SSL_read_ex and SSL_has_pending in a loop), not
by a Python loop over the ssl module's read, one record per turn. Writes,
and reads elsewhere, call the SSLSocket's own `_sslobj` (what its `send` and
`recv_into` end in) directly: two Python frames less per call.

OpenSSL writes each record (16 KiB at most) with its own syscall: 64 per MiB,
each its own packet through the pod's netfilter hooks. Where the SSL object is
reachable, a buffering BIO (BIO_f_buffer, WRITE_COALESCE bytes) goes in front
of the socket for writes, as OpenSSL itself does during the handshake, and is
flushed after every write we hand it: records leave in 64 KiB writes, and a
small write still leaves at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Final, Protocol, cast

from node_agent import openssl
from node_agent.proxy import _tls_reads
from node_agent.proxy.pieces import join_small_runs
from weir_common.futures import fd_ready

log = logging.getLogger(__name__)

READ_BUFFER: Final = 256 * 1024  # decrypted bytes taken per read event, one buffer per thread
READ_AHEAD: Final = 64 * 1024  # OpenSSL's record buffer (module docstring: why not more)
WRITE_COALESCE: Final = 64 * 1024  # per connection, allocated by OpenSSL
WRITE_HIGH: Final = 1024 * 1024
WRITE_LOW: Final = 256 * 1024
# Readiness waits per handshake: a TLS 1.3 handshake takes a handful; this only
# stops a peer trickling bytes from keeping us busy inside the timeout.
MAX_HANDSHAKE_STEPS: Final = 64


async def handshake(
    sock: socket.socket, context: ssl.SSLContext, *, server_side: bool, timeout: float
) -> ssl.SSLSocket:
    """TLS on the connected, non-blocking `sock` (which it takes over), driven by the loop.

    Raises what the handshake failed with (ssl.SSLError, OSError, TimeoutError);
    the socket is closed then.
    """
    loop = asyncio.get_running_loop()
    tls = context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    try:
        async with asyncio.timeout(timeout):
            await _drive(loop, tls)
    except BaseException:
        tls.close()
        raise
    return tls


async def _drive(loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
    fd = tls.fileno()
    for _ in range(MAX_HANDSHAKE_STEPS):
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            await fd_ready(loop.add_reader, loop.remove_reader, fd)
        except ssl.SSLWantWriteError:
            await fd_ready(loop.add_writer, loop.remove_writer, fd)
        else:
            return
    raise ConnectionAbortedError("TLS handshake took too many round trips")


def read_ahead(context: ssl.SSLContext) -> str | None:
    """Let OpenSSL read ahead into a READ_AHEAD-sized buffer; None, or why it could not."""
    reached = _reach_ssl_ctx(context)
    if isinstance(reached, str):
        return reached
    libssl, address = reached
    libssl.SSL_CTX_ctrl(address, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    libssl.SSL_CTX_set_default_read_buffer_len(address, READ_AHEAD)
    return None


# AES-128-GCM first, as BoringSSL (Envoy's, and Go's crypto/tls) orders them
# where the CPU has AES instructions: 1.3x the speed of OpenSSL's first
# choice, AES-256-GCM, on this project's machines (`openssl speed`: 2.46
# against 1.89 GB/s), and a TLS 1.3 suite every peer must offer. The other
# two stay, for peers that prefer them.
TLS13_SUITES: Final = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def order_tls13_suites(context: ssl.SSLContext) -> str | None:
    """Offer and choose TLS 1.3 suites in TLS13_SUITES' order (Python's ssl module sets
    only TLS 1.2 ciphers); None, or why it could not."""
    reached = _reach_ssl_ctx(context)
    if isinstance(reached, str):
        return reached
    libssl, address = reached
    if libssl.SSL_CTX_set_ciphersuites(address, TLS13_SUITES.encode()) != 1:
        return "OpenSSL refused the suite list"
    return None


def _reach_ssl_ctx(context: ssl.SSLContext) -> tuple[ctypes.CDLL, int] | str:
    """libssl and the SSL_CTX* of `context`, or why they cannot be reached.

    Python offers no call for what the callers set, so the SSL_CTX is reached
    through the context object (CPython keeps it right after the object
    header), and only once OpenSSL itself confirms it is the right one: its
    options must be the ones Python reports for `context`.
    """
    try:
        libssl = openssl.libssl()
    except (OSError, AttributeError) as e:
        return f"libssl not loadable: {e}"
    address = _context_address(libssl, context)
    if address is None:
        return "this Python's SSLContext layout is not the one expected"
    return libssl, address


_SSL_CTRL_SET_READ_AHEAD: Final = 41  # openssl/ssl.h
# openssl/bio.h
_BIO_CTRL_FLUSH: Final = 11
_BIO_CTRL_GET_KTLS_SEND: Final = 73
_BIO_C_SET_BUFF_SIZE: Final = 117
_BIO_FLAGS_SHOULD_RETRY: Final = 0x08
# CPython's PySSLSocket: the object header, a weakref to the socket, then the SSL*.
# That start has not changed in years; only 3.11 (what runs here) and the two
# after it are trusted, and OpenSSL confirms it on the first connection.
_SSL_OFFSET: Final = object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
_SSL_LAYOUT_KNOWN: Final = sys.implementation.name == "cpython" and sys.version_info[:2] in {
    (3, 11),
    (3, 12),
    (3, 13),
}


def _context_address(libssl: ctypes.CDLL, context: ssl.SSLContext) -> int | None:
    """The SSL_CTX* of `context` (right after the object header), once OpenSSL confirms
    it: its options must be the ones Python reports."""
    address = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not address or libssl.SSL_CTX_get_options(address) != context.options:
        return None
    return address


class _SslObject(Protocol):
    """What an SSLSocket's `_sslobj` (a `_ssl._SSLSocket`) offers; the calls it ends in."""

    def read(self, size: int, buffer: memoryview) -> int: ...
    def write(self, data: bytes | bytearray | memoryview) -> int: ...


class _LayoutCheck:
    """Whether the SSL* is where CPython keeps it: confirmed by OpenSSL once, on the
    first connection (its socket's fd and its context must be the ones Python has)."""

    confirmed: ClassVar[bool | None] = None


def _ssl_address(tls: ssl.SSLSocket) -> int | None:
    """The SSL* under `tls`, or None where it cannot be reached safely."""
    sslobj = getattr(tls, "_sslobj", None)
    if not _SSL_LAYOUT_KNOWN or sslobj is None or _LayoutCheck.confirmed is False:
        return None
    try:
        libssl = openssl.libssl()
    except (OSError, AttributeError):
        return None
    address = ctypes.c_void_p.from_address(id(sslobj) + _SSL_OFFSET).value
    if not address:
        return None
    if _LayoutCheck.confirmed is None:
        context = _context_address(libssl, tls.context)
        _LayoutCheck.confirmed = (
            context is not None
            and libssl.SSL_get_fd(address) == tls.fileno()
            and libssl.SSL_get_SSL_CTX(address) == context
        )
        if not _LayoutCheck.confirmed:
            log.warning(
                "TLS reads end on SSLWantReadError and records are written one by one: "
                "this Python's SSL object layout is not the one expected"
            )
            return None
        _bind_reads(libssl, openssl.libcrypto())
    return address


def _bind_reads(libssl: ctypes.CDLL, libcrypto: ctypes.CDLL) -> None:
    """Give _tls_reads the OpenSSL functions it calls: those ctypes found, so those
    of the OpenSSL the ssl module runs on."""

    def address(function: object) -> int:
        value = ctypes.cast(function, ctypes.c_void_p).value  # type: ignore[arg-type]
        assert value is not None  # a function ctypes found has an address
        return value

    _tls_reads.bind(
        address(libssl.SSL_read_ex),
        address(libssl.SSL_has_pending),
        address(libssl.SSL_get_error),
        address(libcrypto.ERR_get_error),
        address(libcrypto.ERR_clear_error),
        address(libcrypto.ERR_error_string_n),
    )


def _has_pending_probe(address: int | None) -> Callable[[], int] | None:
    """A call telling whether OpenSSL holds any input of the SSL at `address`
    (SSL_has_pending), or None without one."""
    if address is None:
        return None
    return functools.partial(openssl.libssl().SSL_has_pending, ctypes.c_void_p(address))


class _WriteBuffer:
    """A buffering BIO in front of the socket, for writes only (see the module docstring).

    OpenSSL owns it from installation on (SSL_free frees it with the socket
    BIO it leads to); this only flushes it.
    """

    def __init__(self, address: int) -> None:
        self._bio = ctypes.c_void_p(address)
        flush = openssl.libcrypto().BIO_ctrl
        self._flush = functools.partial(flush, self._bio, _BIO_CTRL_FLUSH, 0, None)

    @classmethod
    def install(cls, address: int | None) -> _WriteBuffer | None:
        """Put a buffer in front of the socket BIO of the SSL at `address`; None where
        it cannot or must not be."""
        if address is None:
            return None
        try:
            libcrypto = openssl.libcrypto()
        except (OSError, AttributeError):
            return None
        libssl = openssl.libssl()
        socket_bio = libssl.SSL_get_wbio(address)
        # With kTLS the kernel frames records: OpenSSL must write to the socket itself.
        if not socket_bio or libcrypto.BIO_ctrl(socket_bio, _BIO_CTRL_GET_KTLS_SEND, 0, None):
            return None
        buffer = libcrypto.BIO_new(libcrypto.BIO_f_buffer())
        if not buffer:
            return None
        if libcrypto.BIO_int_ctrl(buffer, _BIO_C_SET_BUFF_SIZE, WRITE_COALESCE, 1) != 1:
            libcrypto.BIO_free(buffer)
            return None
        # The socket BIO is also the read BIO: one more reference for the chain,
        # which SSL_set0_wbio takes over (dropping the reference the old wbio held).
        libcrypto.BIO_up_ref(socket_bio)
        libcrypto.BIO_push(buffer, socket_bio)
        libssl.SSL_set0_wbio(address, buffer)
        return cls(buffer)

    def flush(self) -> bool | None:
        """True when all went to the socket, False when it would block, None on an error."""
        if self._flush() == 1:
            return True
        if openssl.libcrypto().BIO_test_flags(self._bio, _BIO_FLAGS_SHOULD_RETRY):
            return False
        return None


_buffers = threading.local()


def _read_buffer() -> memoryview:
    """Where decrypted bytes land before they are copied out: one per thread, not one
    per connection (256 KiB each would be most of a busy proxy's memory). Nothing
    holds it across a callback: each read is copied out before data_received."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(READ_BUFFER))
    return view


class TlsTransport(asyncio.Transport):
    """An asyncio transport over a handshaken SSLSocket, for one protocol.

    Writes go straight to OpenSSL; what the socket cannot take yet waits in
    order (the piece OpenSSL already started is retried as it was, as
    SSL_write requires) and the protocol is paused above WRITE_HIGH. `close`
    sends what is queued, then close_notify; `abort` neither.

    With `lend_reads`, data_received is given a view of the thread's read
    buffer, valid until it returns, rather than a copy of it: for a protocol
    that copies whatever it keeps (HBONE's H2Protocol), one copy of every
    byte received less.
    """

    def __init__(
        self, tls: ssl.SSLSocket, protocol: asyncio.BaseProtocol, *, lend_reads: bool = False
    ) -> None:
        super().__init__()
        self._lend_reads = lend_reads
        self._loop = asyncio.get_running_loop()
        self._tls = tls
        sslobj = cast(_SslObject, tls._sslobj)  # type: ignore[attr-defined]
        self._read = sslobj.read
        self._write = sslobj.write
        address = _ssl_address(tls)
        self._ssl = address  # reads go through _tls_reads where this is known
        self._has_pending = _has_pending_probe(address)
        self._buffer = _WriteBuffer.install(address)
        self._buffer_unflushed = False  # a flush would have blocked: the writer finishes it
        self._fd = tls.fileno()
        self._protocol = cast(asyncio.Protocol, protocol)
        self._inflight: bytes | bytearray | memoryview | None = None
        self._queue: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self._queued = 0  # bytes in _inflight and _queue
        self._high = WRITE_HIGH
        self._low = WRITE_LOW
        self._protocol_paused = False
        self._reading = False
        self._writer_armed = False
        self._write_waits_for_read = False
        self._closing = False
        self._lost = False
        try:
            peername = tls.getpeername()
            sockname = tls.getsockname()
        except OSError:
            peername = sockname = None
        self._extra: dict[str, Any] = {
            "ssl_object": tls,
            "socket": tls,
            "peername": peername,
            "sockname": sockname,
            "cipher": tls.cipher(),
            "compression": None,
        }
        protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()
            # Reading ahead, the handshake may have taken the peer's first records
            # (its preface, SETTINGS, a request) out of the kernel already: the
            # loop will never report them, so look once now.
            self._loop.call_soon(self._read_what_the_handshake_took)

    # -- asyncio.BaseTransport ---------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401 (asyncio's signature)
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if self._inflight is None and not self._queue and not self._buffer_unflushed:
            self._loop.call_soon(self._finish, None, True)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # -- reading ---------------------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._stop_reading()

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _read_what_the_handshake_took(self) -> None:
        if self._has_pending is None or self._has_pending():
            self._on_readable()

    def _on_readable(self) -> None:
        if not self._reading:
            return  # paused or closed since this was scheduled
        if self._write_waits_for_read:
            self._write_waits_for_read = False
            self._on_writable()
        view = _read_buffer()
        got, outcome = self._read_into(view)
        if got:
            data = view[:got] if self._lend_reads else bytes(view[:got])
            # A lent view goes only to protocols that take one (lend_reads).
            self._protocol.data_received(data)  # type: ignore[arg-type]
        if isinstance(outcome, OSError):
            self._fatal(outcome)
        elif outcome == "full" and self._reading:
            # The buffer filled: what OpenSSL read ahead is not the kernel's to report.
            self._loop.call_soon(self._on_readable)
        elif outcome == "eof" and not self._lost:
            self._stop_reading()
            if not self._protocol.eof_received():
                self.close()

    def _read_into(self, view: memoryview) -> tuple[int, str | OSError]:
        """Decrypted bytes into `view`: how many, and what ended the reading: "full"
        (the buffer), "drained" (OpenSSL holds nothing more), "eof", or the error."""
        if self._ssl is not None:
            return _tls_reads.read_into(self._ssl, self._fd, view)
        # Without the SSL object: on until OpenSSL wants more from the kernel.
        read = self._read
        got = 0
        try:
            while got < READ_BUFFER:
                n = read(READ_BUFFER - got, view[got:])
                if n == 0:
                    return got, "eof"
                got += n
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return got, "drained"  # (or only a session ticket or a key update came)
        except ssl.SSLEOFError:
            return got, "eof"  # closed without close_notify: an EOF, as SSLSocket reads it
        except OSError as e:  # ssl.SSLError included: a bad record, a reset
            return got, e
        return got, "full"

    # -- writing ---------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Each piece to OpenSSL as it is (no joining copy), the socket written once at the end.

        A piece is kept, not copied, while it waits for the socket: the caller
        must not change it.
        """
        if self._closing or self._lost:
            return
        for data in list_of_data:
            if not data:
                continue
            if self._inflight is not None or self._queue:
                self._queue.append(data)
                self._queued += len(data)
            elif not self._send(data) and self._lost:
                return
        if self._inflight is None and not self._queue:
            self._flush_buffer()
        else:
            self._maybe_pause_protocol()

    def _send(self, data: bytes | bytearray | memoryview) -> bool:
        """Hand `data` to OpenSSL; whether it took all of it (the write buffer is not
        flushed). What it cannot take now becomes the in-flight piece."""
        try:
            sent = self._write(data)
        except ssl.SSLWantWriteError:
            sent = 0
        except ssl.SSLWantReadError:
            # Not in TLS 1.3 as we use it; if it happens, the next readable retries.
            sent = 0
            self._write_waits_for_read = True
        except OSError as e:
            self._fatal(e)
            return False
        if sent == len(data):
            return True
        if sent == 0:
            self._inflight = data  # OpenSSL may hold part of it: retried exactly as it was
            self._queued += len(data)
        else:  # a partial write completed: the rest is a new write
            rest = memoryview(data)[sent:]
            self._queue.appendleft(rest)
            self._queued += len(rest)
        self._arm_writer()
        return False

    def _arm_writer(self) -> None:
        if not self._writer_armed and not self._write_waits_for_read:
            self._writer_armed = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _flush_buffer(self) -> bool:
        """Whether the write buffer is empty now; when it would block, the writer is armed."""
        if self._buffer is None:
            return True
        flushed = self._buffer.flush()
        if flushed:
            self._buffer_unflushed = False
            return True
        if flushed is None:
            error = self._tls.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._fatal(OSError(error, os.strerror(error)) if error else ConnectionResetError())
            return False
        self._buffer_unflushed = True
        self._arm_writer()
        return False

    def _on_writable(self) -> None:
        if self._buffer_unflushed and not self._flush_buffer():
            return
        queue = self._queue
        if len(queue) > 1:
            # Small pieces queued meanwhile go out joined: fewer records.
            pieces = join_small_runs(queue)
            queue.clear()
            queue.extend(pieces)
        while self._inflight is not None or queue:
            if self._inflight is None:
                data = queue.popleft()
                self._queued -= len(data)
                if not self._send(data):
                    return
                continue
            data = self._inflight
            try:
                sent = self._write(data)
            except ssl.SSLWantWriteError:
                return
            except ssl.SSLWantReadError:
                self._write_waits_for_read = True
                self._disarm_writer()
                return
            except OSError as e:
                self._fatal(e)
                return
            self._inflight = None
            self._queued -= len(data)
            if sent < len(data):
                rest = memoryview(data)[sent:]
                self._queue.appendleft(rest)
                self._queued += len(rest)
        if not self._flush_buffer():
            return
        self._disarm_writer()
        if self._protocol_paused and self._queued <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if self._closing and not self._lost:
            self._finish(None, True)

    def _disarm_writer(self) -> None:
        if self._writer_armed:
            self._writer_armed = False
            self._loop.remove_writer(self._fd)

    def _maybe_pause_protocol(self) -> None:
        if not self._protocol_paused and self._queued > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify, not a half-close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    def get_write_buffer_size(self) -> int:
        return self._queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = WRITE_HIGH if high is None else high
        self._low = self._high // 4 if low is None else low

    def abort(self) -> None:
        self._closing = True
        self._finish(None, False)

    # -- the end -----------------------------------------------------------------------

    def _fatal(self, exc: Exception) -> None:
        self._closing = True
        self._finish(exc, False)

    def _finish(self, exc: Exception | None, notify: bool) -> None:
        if self._lost:
            return
        self._lost = True
        self._stop_reading()
        self._disarm_writer()
        self._queue.clear()
        self._inflight = None
        if notify:
            # close_notify: the first SSL_shutdown sends ours; the peer's is not awaited.
            with contextlib.suppress(OSError, ValueError):
                self._tls.unwrap()
        self._tls.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)
