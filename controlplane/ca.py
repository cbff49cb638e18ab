"""The workload certificate authority: CSR in, X.509 SVID chain out.

Nodes generate keys and send CSRs; the CA never sees a workload's private
key. Who may ask for which identity is decided in controlplane.auth; this
module checks the CSR itself and signs. The signing key is either a root
generated on first start and kept in the state directory (local mode), or an
operator-provided intermediate.
"""

import datetime
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.auth import invalid_argument
from weir_common.atomic_file import write_atomically
from weir_common.errors import InvalidInputError, NodeSetupError
from weir_common.mesh import SpiffeId

DEFAULT_TTL: Final = datetime.timedelta(hours=24)
MAX_TTL: Final = datetime.timedelta(hours=48)
ROOT_TTL: Final = datetime.timedelta(days=3650)
# Issued certificates start slightly in the past so a node whose clock is a
# little behind accepts them at once.
BACKDATE: Final = datetime.timedelta(minutes=5)
MAX_CSR_BYTES: Final = 16 * 1024
ROOT_CERT_FILE: Final = "root-cert.pem"
ROOT_KEY_FILE: Final = "root-key.pem"
_DNS_LABEL_RE: Final = re.compile(r"[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?")


class CertificateAuthority:
    def __init__(
        self,
        *,
        signing_cert: x509.Certificate,
        signing_key: ec.EllipticCurvePrivateKey,
        intermediates: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        default_ttl: datetime.timedelta = DEFAULT_TTL,
        max_ttl: datetime.timedelta = MAX_TTL,
    ) -> None:
        self._signing_cert = signing_cert
        self._signing_key = signing_key
        # Sent after the leaf: the signing cert unless it is a root, then its parents.
        self._chain = [c for c in (signing_cert, *intermediates) if c not in roots]
        self._roots = list(roots)
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl

    @property
    def trust_bundle_pem(self) -> list[str]:
        return [_pem(root) for root in self._roots]

    def sign(
        self,
        csr_pem: str,
        identity: SpiffeId,
        *,
        ttl: datetime.timedelta | None,
        now: datetime.datetime,
    ) -> list[str]:
        """PEM chain, leaf first, for a CSR whose only SAN is `identity`."""
        if ttl is not None and ttl > self.max_ttl:
            raise invalid_argument(
                "bad_validity", f"validity {ttl} exceeds the maximum {self.max_ttl}"
            )
        csr = check_csr(csr_pem, identity)
        return self._issue(
            csr.public_key(),
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            not_after=now + (ttl or self.default_ttl),
            now=now,
        )

    def issue_serving(
        self,
        public_key: ec.EllipticCurvePublicKey,
        names: Sequence[str],
        *,
        ttl: datetime.timedelta,
        now: datetime.datetime,
    ) -> list[str]:
        """PEM chain, leaf first, for the control plane's own TLS listener.

        `names` are the DNS names and IP addresses clients dial; the key is the
        control plane's own, generated in-process, so there is no CSR to check.
        """
        if not names:
            raise InvalidInputError("a serving certificate needs at least one DNS name or IP")
        return self._issue(
            public_key,
            x509.SubjectAlternativeName([_general_name(name) for name in names]),
            [ExtendedKeyUsageOID.SERVER_AUTH],
            not_after=now + ttl,
            now=now,
        )

    def _issue(
        self,
        public_key: CertificatePublicKeyTypes,
        sans: x509.SubjectAlternativeName,
        usages: Sequence[x509.ObjectIdentifier],
        *,
        not_after: datetime.datetime,
        now: datetime.datetime,
    ) -> list[str]:
        issuer_ski = self._signing_cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._signing_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            # Never outlive the signing certificate: the chain would not verify.
            .not_valid_after(min(not_after, self._signing_cert.not_valid_after_utc))
            # An empty subject requires a critical SAN (RFC 5280 4.2.1.6).
            .add_extension(sans, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._signing_key, hashes.SHA256())
        )
        return [_pem(certificate), *(_pem(c) for c in self._chain)]


def check_csr(csr_pem: str, identity: SpiffeId) -> x509.CertificateSigningRequest:
    """The CSR, if it is well formed, self-signed, P-256, and names only `identity`."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise invalid_argument("malformed_csr", f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, x509.InvalidVersion) as exc:
        raise invalid_argument("malformed_csr", f"CSR is not PEM PKCS#10: {exc}") from None
    try:
        # The parts below are parsed only when read: a broken key or extension shows here.
        signed = csr.is_signature_valid
        key = csr.public_key()
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, UnsupportedAlgorithm) as exc:
        raise invalid_argument("malformed_csr", f"CSR is not well formed: {exc}") from None
    if not signed:
        raise invalid_argument("malformed_csr", "CSR signature does not verify")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise invalid_argument("bad_key", "CSR key must be ECDSA P-256")
    try:
        sans = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise invalid_argument("san_mismatch", f"CSR has no SAN; expected URI {identity}") from None
    names = [str(name.value) for name in sans]
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(sans) != 1 or uris != [str(identity)]:
        raise invalid_argument(
            "san_mismatch", f"CSR SANs {names} are not exactly the requested URI {identity}"
        )
    return csr


def load_or_create_root(
    directory: Path, trust_domain: str, *, now: datetime.datetime
) -> CertificateAuthority:
    """The self-signed root kept in `directory`, created there on first start."""
    cert_path, key_path = directory / ROOT_CERT_FILE, directory / ROOT_KEY_FILE
    if cert_path.exists() != key_path.exists():
        present = cert_path if cert_path.exists() else key_path
        raise NodeSetupError(
            f"{present} exists without its pair in {directory}; restore it or remove it "
            "to create a new root (every workload certificate will change)"
        )
    if not cert_path.exists():
        cert_pem, key_pem = generate_root(trust_domain, now=now)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(key_path, key_pem)
        write_atomically(cert_path, cert_pem)
    cert = _load_certs(cert_path)[0]
    return CertificateAuthority(
        signing_cert=cert, signing_key=_load_key(key_path), intermediates=[], roots=[cert]
    )


def generate_root(trust_domain: str, *, now: datetime.datetime) -> tuple[bytes, bytes]:
    """A new self-signed mesh root: (certificate PEM, PKCS#8 key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed_root(key, trust_domain, now)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def root_authority(cert_pem: bytes, key_pem: bytes, *, source: str) -> CertificateAuthority:
    """The CA of a self-signed root kept elsewhere (a Secret); `source` names it in errors."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        # The loader's message never quotes the key material.
        raise InvalidInputError(f"{source}: cannot load the root: {exc}") from None
    if len(certs) != 1:
        raise InvalidInputError(f"{source}: expected one root certificate, found {len(certs)}")
    cert = certs[0]
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInputError(f"{source}: the CA key must be ECDSA")
    if cert.public_key() != key.public_key():
        raise InvalidInputError(f"{source}: the key is not the certificate's")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InvalidInputError(f"{source}: the certificate is not a CA")
    return CertificateAuthority(signing_cert=cert, signing_key=key, intermediates=[], roots=[cert])


def load_intermediate(cert_path: Path, key_path: Path, roots_path: Path) -> CertificateAuthority:
    """An operator's intermediate: `cert_path` holds it (then its parents, if any)."""
    chain = _load_certs(cert_path)
    roots = _load_certs(roots_path)
    key = _load_key(key_path)
    signing = chain[0]
    if signing.public_key() != key.public_key():
        raise InvalidInputError(f"{key_path} is not the key of the certificate in {cert_path}")
    constraints = signing.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise InvalidInputError(f"{cert_path}: first certificate is not a CA")
    top = chain[-1]
    if not any(_issued_by(top, root) for root in roots):
        raise InvalidInputError(f"{cert_path}: chain does not lead to a root in {roots_path}")
    return CertificateAuthority(
        signing_cert=signing, signing_key=key, intermediates=chain[1:], roots=roots
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _self_signed_root(
    key: ec.EllipticCurvePrivateKey, trust_domain: str, now: datetime.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Weir"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Weir root CA for {trust_domain}"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: cannot load PEM certificates: {exc}") from exc
    return certs


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{path}: cannot load private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInputError(f"{path}: CA key must be ECDSA")
    return key


def _general_name(name: str) -> x509.GeneralName:
    """An IP address SAN if `name` is one, else a DNS name SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise InvalidInputError(f"{name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
