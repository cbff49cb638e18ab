"""Kernel TLS (kTLS): asked for on every context, and what this node can give said once.

HBONE's TLS runs on sockets OpenSSL owns (tls_transport), so kTLS needs no
data path of its own: with SSL_OP_ENABLE_KTLS on the context, OpenSSL hands
a connection's keys to the kernel after the handshake, for each direction
the kernel and OpenSSL support, and then reads and writes through it as
before. What stays in user space keeps working as it did.

What decides it:
- the kernel's `tls` TCP ULP (CONFIG_TLS, or the tls module loaded); without
  it nothing moves to the kernel;
- OpenSSL before 3.2 gives the kernel TLS 1.3 keys for transmit only (3.0's
  tls13_change_cipher_state skips kTLS for receive); receive came with 3.2;
- a cipher the kernel offers (AES-GCM always; ChaCha20-Poly1305 with its
  module).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

# OpenSSL's SSL_OP_ENABLE_KTLS (ssl.OP_ENABLE_KTLS from Python 3.12 on).
SSL_OP_ENABLE_KTLS: Final = 1 << 3
# OpenSSL gives TLS 1.3 receive keys to the kernel from this version on.
OPENSSL_TLS13_RX: Final = (3, 2)
AVAILABLE_ULP_FILE: Final = Path("/proc/sys/net/ipv4/tcp_available_ulp")


def enable(context: ssl.SSLContext) -> None:
    """Ask OpenSSL to hand the keys of this context's connections to the kernel."""
    context.options |= SSL_OP_ENABLE_KTLS


def assess(*, available_ulps: str | None, openssl_version: tuple[int, ...], tls13: bool) -> str:
    """What kTLS gives connections under these conditions, as a log line says it."""
    if available_ulps is None:
        return (
            "kernel TLS off: the kernel has no TCP upper-layer protocols"
            f" ({AVAILABLE_ULP_FILE} is missing); TLS runs in OpenSSL"
        )
    if "tls" not in available_ulps.split():
        offered = available_ulps.strip() or "none"
        return (
            f"kernel TLS off: the kernel offers no 'tls' TCP ULP (available: {offered});"
            " CONFIG_TLS is off or the tls module is not loaded; TLS runs in OpenSSL"
        )
    if tls13 and tuple(openssl_version[:2]) < OPENSSL_TLS13_RX:
        have = ".".join(str(part) for part in openssl_version[:3])
        return (
            f"kernel TLS for transmit only: OpenSSL {have} gives TLS 1.3 receive keys to"
            f" the kernel from {'.'.join(map(str, OPENSSL_TLS13_RX))} on; receive runs in OpenSSL"
        )
    return "kernel TLS both ways (where the negotiated cipher is one the kernel offers)"


def status(context: ssl.SSLContext) -> str:
    """`assess` for this host, this OpenSSL and `context`."""
    try:
        ulps: str | None = AVAILABLE_ULP_FILE.read_text()
    except FileNotFoundError:
        ulps = None
    if not context.options & SSL_OP_ENABLE_KTLS:
        return "kernel TLS off: not enabled on this TLS context; TLS runs in OpenSSL"
    return assess(
        available_ulps=ulps,
        openssl_version=openssl_version(),
        tls13=context.maximum_version in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3),
    )


def openssl_version() -> tuple[int, int, int]:
    major, minor, fix, patch, _ = ssl.OPENSSL_VERSION_INFO
    # From 3.0 the number is MNN00PP0S: the third field is always 0, the patch is the fourth.
    return (major, minor, patch) if major >= 3 else (major, minor, fix)
