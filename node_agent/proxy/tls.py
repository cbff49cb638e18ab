"""TLS for HBONE: contexts built from a workload's SVID, and the peer's SPIFFE ID.

Keys never touch a filesystem: Python's ssl module only loads a certificate
chain from a path, so the PEM goes into an anonymous memfd that is read back
through /proc/self/fd and closed at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import ssl
from collections.abc import Sequence
from typing import Final

from node_agent.proxy import ktls, tls_transport
from node_agent.proxy.identity import WorkloadCertificate
from weir_common import openssl_runtime
from weir_common.errors import InvalidInputError
from weir_common.mesh import SpiffeId

ALPN_H2: Final = "h2"
log = logging.getLogger(__name__)


@functools.cache
def _log_once(level: int, message: str) -> None:
    log.log(level, "%s", message)


def server_context(cert: WorkloadCertificate, trust_bundle: Sequence[str]) -> ssl.SSLContext:
    """Presents `cert`; requires a client certificate chaining to `trust_bundle`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, cert, trust_bundle)
    # No session tickets: peers hold one pooled connection for hours and never
    # resume, and a ticket nobody reads would turn the client's close into a reset.
    ctx.num_tickets = 0
    return ctx


def client_context(cert: WorkloadCertificate, trust_bundle: Sequence[str]) -> ssl.SSLContext:
    """Presents `cert`; the caller checks the server's SPIFFE ID (no hostnames in the mesh)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _configure(ctx, cert, trust_bundle)
    return ctx


def _configure(ctx: ssl.SSLContext, cert: WorkloadCertificate, trust_bundle: Sequence[str]) -> None:
    if not trust_bundle:
        raise InvalidInputError("empty trust bundle: no peer could be verified")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata="".join(trust_bundle))
    ctx.set_alpn_protocols([ALPN_H2])
    why_not = tls_transport.read_ahead(ctx)
    if why_not is not None:
        _log_once(logging.WARNING, f"TLS reads one record per two syscalls: {why_not}")
    why_not = tls_transport.order_tls13_suites(ctx)
    if why_not is not None:
        _log_once(logging.WARNING, f"TLS 1.3 suites in OpenSSL's default order: {why_not}")
    ktls.enable(ctx)
    _log_once(logging.INFO, ktls.status(ctx))
    fast, line = openssl_runtime.assess(
        ssl.OPENSSL_VERSION_INFO[:2],
        weirs=openssl_runtime.loaded_from() is not None,
        expected_dir=openssl_runtime.library_dir(),
    )
    _log_once(logging.INFO if fast else logging.WARNING, line)
    fd = os.memfd_create("weir-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, "".join(cert.chain_pem).encode() + cert.private_key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> SpiffeId | None:
    """The verified peer's SPIFFE ID: its one URI SAN, if that is a workload identity."""
    if ssl_object is None:
        return None
    with contextlib.suppress(ValueError):
        cert = ssl_object.getpeercert()
        sans = cert.get("subjectAltName", ()) if cert else ()
        uris = [value for kind, value in sans if kind == "URI"]  # type: ignore[str-unpack]
        if len(uris) == 1 and isinstance(uris[0], str):
            return SpiffeId.parse(uris[0])
    return None
