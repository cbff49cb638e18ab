"""The gRPC listener's own TLS certificate: issued by the mesh CA, renewed in place.

Nodes verify the control plane against the mesh root they already trust for
workload certificates, so the control plane needs no certificate from anyone
else: it generates a key, has its own CA sign it for the names clients dial,
and serves it. gRPC asks for the current certificate on every new connection
(the fetcher below, called from a gRPC core thread); once the certificate is
past half its life a new one is issued there, so it is replaced long before it
expires and without a restart. Established connections keep the certificate
they were handshaken with, which TLS does not look at again.
"""

import datetime
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca import CertificateAuthority

log = logging.getLogger(__name__)

DEFAULT_SERVING_TTL: Final = datetime.timedelta(hours=24)
# What a client dialing the control plane on its own host uses.
LOCAL_NAMES: Final = ("localhost", "127.0.0.1")


def default_names(listen: str) -> tuple[str, ...]:
    """LOCAL_NAMES plus the host of `listen` ("host:port", "[v6]:port").

    A wildcard listen address (0.0.0.0, ::) is no name anyone dials, so it is
    left out; operators list the real names with --serving-name.
    """
    host = listen.rpartition(":")[0].strip("[]")
    names = list(LOCAL_NAMES)
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = not host
    if not unspecified and host not in names:
        names.append(host)
    return tuple(names)


class ServingCertificate:
    def __init__(
        self,
        ca: CertificateAuthority,
        names: Iterable[str],
        *,
        ttl: datetime.timedelta = DEFAULT_SERVING_TTL,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self._ca = ca
        self.names: Sequence[str] = tuple(names)
        self._ttl = ttl
        self._clock = clock
        # gRPC calls the fetcher from its own threads, possibly several at once.
        self._lock = threading.Lock()
        self._chain: list[str]
        self._renew_at: datetime.datetime
        self._configuration = self._issue()
        # Whether gRPC already has _configuration (the fetcher then answers None).
        self._handed_out = False

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that serve the current certificate to each new connection."""
        with self._lock:
            self._handed_out = True
            # grpc-stubs types the fetcher as never returning None, but gRPC
            # documents None as "keep the current configuration".
            return grpc.dynamic_ssl_server_credentials(
                self._configuration,
                self._fetch,  # type: ignore[arg-type]
            )

    def dump(self) -> dict[str, Any]:
        """The certificate's public facts, for config_dump (never the key)."""
        with self._lock:
            leaf = x509.load_pem_x509_certificate(self._chain[0].encode())
            return {
                "names": list(self.names),
                "serial": f"{leaf.serial_number:x}",
                "not_after": leaf.not_valid_after_utc.isoformat(),
                "renew_at": self._renew_at.isoformat(),
                "chain_pem": list(self._chain),
            }

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC per handshake: a new configuration, or None to keep the last."""
        with self._lock:
            if self._clock() >= self._renew_at:
                self._configuration = self._issue()
                self._handed_out = False
            if self._handed_out:
                return None
            self._handed_out = True
            return self._configuration

    def _issue(self) -> grpc.ServerCertificateConfiguration:
        """A new key and certificate; sets the renewal time and the chain."""
        now = self._clock()
        key = ec.generate_private_key(ec.SECP256R1())
        chain = self._ca.issue_serving(key.public_key(), self.names, ttl=self._ttl, now=now)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        # Half life, measured from now: the backdating of not_before is not life.
        self._renew_at = now + (leaf.not_valid_after_utc - now) / 2
        self._chain = chain
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        log.info(
            "serving certificate issued for %s (serial %x, expires %s)",
            ", ".join(self.names),
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(),
        )
        return grpc.ssl_server_certificate_configuration([(key_pem, "".join(chain).encode())])
