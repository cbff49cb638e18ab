"""The OpenSSL Python's ssl module runs on, called through ctypes: the one place it is loaded.

Two users:
- the node proxy's TLS transport, for the SSL and BIO calls the ssl module
  does not expose (node_agent.proxy.tls_transport);
- workload keys, CSRs and what the node reads from an issued certificate
  (`new_key_and_csr`, `certificate_facts`). They used to come from the
  `cryptography` package, which costs a node proxy about 9 MiB of resident
  memory (its Rust extension and bindings) for a handful of calls into the
  libcrypto that is mapped anyway.

Every call's result is checked; a failure raises OpenSslError with OpenSSL's
own reason, and nothing allocated here outlives the call that made it.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import ssl
from dataclasses import dataclass
from typing import Final

# From OpenSSL's headers (stable ABI values).
_BIO_CTRL_INFO: Final = 3  # BIO_get_mem_data
_NID_SUBJECT_ALT_NAME: Final = 85
_GEN_URI: Final = 6
_X509V3_ADD_DEFAULT: Final = 0
_X509_REQ_VERSION_1: Final = 0


class OpenSslError(ValueError):
    """An OpenSSL call failed; the message has OpenSSL's reason."""


@dataclass(frozen=True)
class CertificateFacts:
    """What the node reads from an issued certificate."""

    not_before: datetime.datetime
    not_after: datetime.datetime
    serial: str  # lowercase hex without leading zeros, as the control plane logs it


class _Tm(ctypes.Structure):
    """glibc's struct tm (ASN1_TIME_to_tm fills it)."""

    _fields_ = (
        ("tm_sec", ctypes.c_int),
        ("tm_min", ctypes.c_int),
        ("tm_hour", ctypes.c_int),
        ("tm_mday", ctypes.c_int),
        ("tm_mon", ctypes.c_int),
        ("tm_year", ctypes.c_int),
        ("tm_wday", ctypes.c_int),
        ("tm_yday", ctypes.c_int),
        ("tm_isdst", ctypes.c_int),
        ("tm_gmtoff", ctypes.c_long),
        ("tm_zone", ctypes.c_char_p),
    )


def _soversion() -> int:
    major = ssl.OPENSSL_VERSION_INFO[0]
    if major < 3:
        raise OSError(f"OpenSSL {ssl.OPENSSL_VERSION} is older than 3")
    return major


_Prototype = tuple[str, object, list[object]]


def _declare(library: ctypes.CDLL, prototypes: tuple[_Prototype, ...]) -> None:
    for name, restype, argtypes in prototypes:
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = argtypes


_P = ctypes.c_void_p
_INT = ctypes.c_int
_LONG = ctypes.c_long


@functools.cache
def libssl() -> ctypes.CDLL:
    """The libssl Python's ssl module runs on (the same soname, loaded once)."""
    libcrypto()  # first: it checks that this is the OpenSSL the ssl module runs on
    library = ctypes.CDLL(f"libssl.so.{_soversion()}")
    _declare(
        library,
        (
            ("SSL_CTX_get_options", ctypes.c_uint64, [_P]),
            ("SSL_CTX_ctrl", _LONG, [_P, _INT, _LONG, _P]),
            ("SSL_CTX_set_default_read_buffer_len", None, [_P, ctypes.c_size_t]),
            ("SSL_CTX_set_ciphersuites", _INT, [_P, ctypes.c_char_p]),
            ("SSL_has_pending", _INT, [_P]),
            ("SSL_get_fd", _INT, [_P]),
            ("SSL_get_SSL_CTX", _P, [_P]),
            ("SSL_get_wbio", _P, [_P]),
            ("SSL_set0_wbio", None, [_P, _P]),
        ),
    )
    return library


@functools.cache
def libcrypto() -> ctypes.CDLL:
    """The libcrypto beside `libssl`."""
    library = ctypes.CDLL(f"libcrypto.so.{_soversion()}")
    _declare(
        library,
        (
            ("OpenSSL_version_num", ctypes.c_ulong, []),
            # BIOs: the proxy's write buffer, and memory BIOs for PEM in and out.
            ("BIO_f_buffer", _P, []),  # a BIO_METHOD*
            ("BIO_s_mem", _P, []),
            ("BIO_s_secmem", _P, []),
            ("BIO_new", _P, [_P]),
            ("BIO_new_mem_buf", _P, [ctypes.c_char_p, _INT]),
            ("BIO_free", _INT, [_P]),
            ("BIO_up_ref", _INT, [_P]),
            ("BIO_push", _P, [_P, _P]),
            ("BIO_ctrl", _LONG, [_P, _INT, _LONG, _P]),
            ("BIO_int_ctrl", _LONG, [_P, _INT, _LONG, _INT]),
            ("BIO_test_flags", _INT, [_P, _INT]),
            # Keys.
            ("EVP_PKEY_CTX_new_from_name", _P, [_P, ctypes.c_char_p, ctypes.c_char_p]),
            ("EVP_PKEY_keygen_init", _INT, [_P]),
            ("EVP_PKEY_CTX_set_group_name", _INT, [_P, ctypes.c_char_p]),
            ("EVP_PKEY_generate", _INT, [_P, ctypes.POINTER(_P)]),
            ("EVP_PKEY_CTX_free", None, [_P]),
            ("EVP_PKEY_free", None, [_P]),
            ("EVP_sha256", _P, []),
            ("PEM_write_bio_PrivateKey", _INT, [_P, _P, _P, _P, _INT, _P, _P]),
            # CSRs.
            ("X509_REQ_new", _P, []),
            ("X509_REQ_free", None, [_P]),
            ("X509_REQ_set_version", _INT, [_P, _LONG]),
            ("X509_REQ_set_pubkey", _INT, [_P, _P]),
            ("X509_REQ_add_extensions", _INT, [_P, _P]),
            ("X509_REQ_sign", _INT, [_P, _P, _P]),
            ("PEM_write_bio_X509_REQ", _INT, [_P, _P]),
            ("GENERAL_NAMES_new", _P, []),
            ("GENERAL_NAMES_free", None, [_P]),
            ("GENERAL_NAME_new", _P, []),
            ("GENERAL_NAME_free", None, [_P]),
            ("GENERAL_NAME_set0_value", None, [_P, _INT, _P]),
            ("ASN1_IA5STRING_new", _P, []),
            ("ASN1_IA5STRING_free", None, [_P]),
            ("ASN1_STRING_set", _INT, [_P, ctypes.c_char_p, _INT]),
            ("OPENSSL_sk_push", _INT, [_P, _P]),
            ("OPENSSL_sk_pop_free", None, [_P, _P]),
            ("X509V3_add1_i2d", _INT, [ctypes.POINTER(_P), _INT, _P, _INT, ctypes.c_ulong]),
            # Certificates.
            ("PEM_read_bio_X509", _P, [_P, _P, _P, _P]),
            ("X509_free", None, [_P]),
            ("X509_get0_notBefore", _P, [_P]),
            ("X509_get0_notAfter", _P, [_P]),
            ("X509_get0_serialNumber", _P, [_P]),
            ("ASN1_TIME_to_tm", _INT, [_P, ctypes.POINTER(_Tm)]),
            ("ASN1_INTEGER_to_BN", _P, [_P, _P]),
            ("BN_bn2hex", ctypes.c_void_p, [_P]),  # char*, freed with CRYPTO_free
            ("BN_free", None, [_P]),
            ("CRYPTO_free", None, [_P, ctypes.c_char_p, _INT]),
            # Errors.
            ("ERR_get_error", ctypes.c_ulong, []),
            ("ERR_error_string_n", None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
            ("ERR_clear_error", None, []),
        ),
    )
    # The soname finds whichever libcrypto this process loaded first; if that is
    # not the one the ssl module runs on, our calls would hand one OpenSSL's
    # objects to another (weir_common/openssl_runtime.py keeps them one).
    if library.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise OSError(
            f"libcrypto.so.{_soversion()} is OpenSSL {library.OpenSSL_version_num():#x}, "
            f"but the ssl module runs on {ssl.OPENSSL_VERSION}"
        )
    return library


def _failed(what: str) -> OpenSslError:
    """OpenSslError for `what`, with the reasons OpenSSL queued (and the queue emptied)."""
    crypto = libcrypto()
    reasons = []
    while code := crypto.ERR_get_error():
        text = ctypes.create_string_buffer(256)
        crypto.ERR_error_string_n(code, text, len(text))
        reasons.append(text.value.decode(errors="replace"))
    return OpenSslError(f"{what} failed: {'; '.join(reasons) or 'no reason given'}")


def _check(result: int, what: str) -> None:
    """For calls that return 1 on success and 0 or less on failure."""
    if result <= 0:
        raise _failed(what)


def _new(pointer: int | None, what: str) -> int:
    if not pointer:
        raise _failed(what)
    return pointer


def _bio_bytes(bio: int) -> bytes:
    data = ctypes.c_char_p()
    size = libcrypto().BIO_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.byref(data))
    return ctypes.string_at(data, size)


def new_key_and_csr(spiffe_id: str) -> tuple[bytes, str]:
    """A fresh P-256 key (PKCS#8 PEM) and a CSR for it naming `spiffe_id` as its only
    subject alternative name (critical; empty subject), signed with SHA-256."""
    uri = spiffe_id.encode("ascii")
    crypto = libcrypto()
    crypto.ERR_clear_error()
    pkey = _P()
    context = req = names = key_out = csr_out = None
    extensions = _P()
    try:
        context = _new(crypto.EVP_PKEY_CTX_new_from_name(None, b"EC", None), "EVP_PKEY_CTX_new")
        _check(crypto.EVP_PKEY_keygen_init(context), "EVP_PKEY_keygen_init")
        _check(crypto.EVP_PKEY_CTX_set_group_name(context, b"P-256"), "setting the curve")
        _check(crypto.EVP_PKEY_generate(context, ctypes.byref(pkey)), "generating the key")

        req = _new(crypto.X509_REQ_new(), "X509_REQ_new")
        _check(crypto.X509_REQ_set_version(req, _X509_REQ_VERSION_1), "X509_REQ_set_version")
        _check(crypto.X509_REQ_set_pubkey(req, pkey), "X509_REQ_set_pubkey")
        names = _new(crypto.GENERAL_NAMES_new(), "GENERAL_NAMES_new")
        _push_uri(names, uri)
        _check(
            crypto.X509V3_add1_i2d(
                ctypes.byref(extensions), _NID_SUBJECT_ALT_NAME, names, 1, _X509V3_ADD_DEFAULT
            ),
            "adding the subject alternative name",
        )
        _check(crypto.X509_REQ_add_extensions(req, extensions), "X509_REQ_add_extensions")
        _check(crypto.X509_REQ_sign(req, pkey, crypto.EVP_sha256()), "signing the CSR")

        # The key's PEM goes through secure-heap memory, cleared when freed.
        key_out = _new(crypto.BIO_new(crypto.BIO_s_secmem()), "BIO_new")
        _check(
            crypto.PEM_write_bio_PrivateKey(key_out, pkey, None, None, 0, None, None),
            "writing the key",
        )
        csr_out = _new(crypto.BIO_new(crypto.BIO_s_mem()), "BIO_new")
        _check(crypto.PEM_write_bio_X509_REQ(csr_out, req), "writing the CSR")
        return _bio_bytes(key_out), _bio_bytes(csr_out).decode("ascii")
    finally:
        if extensions:
            crypto.OPENSSL_sk_pop_free(extensions, ctypes.cast(crypto.X509_EXTENSION_free, _P))
        for free, pointer in (
            (crypto.GENERAL_NAMES_free, names),
            (crypto.X509_REQ_free, req),
            (crypto.EVP_PKEY_free, pkey.value),
            (crypto.EVP_PKEY_CTX_free, context),
            (crypto.BIO_free, key_out),
            (crypto.BIO_free, csr_out),
        ):
            if pointer:
                free(pointer)


def _push_uri(names: int, uri: bytes) -> None:
    """Append a URI GENERAL_NAME to `names` (which then owns it)."""
    crypto = libcrypto()
    text = _new(crypto.ASN1_IA5STRING_new(), "ASN1_IA5STRING_new")
    name = crypto.GENERAL_NAME_new()
    if not name:
        crypto.ASN1_IA5STRING_free(text)
        raise _failed("GENERAL_NAME_new")
    if crypto.ASN1_STRING_set(text, uri, len(uri)) <= 0:
        crypto.ASN1_IA5STRING_free(text)
        crypto.GENERAL_NAME_free(name)
        raise _failed("ASN1_STRING_set")
    crypto.GENERAL_NAME_set0_value(name, _GEN_URI, text)  # name owns text from here
    if crypto.OPENSSL_sk_push(names, name) <= 0:
        crypto.GENERAL_NAME_free(name)
        raise _failed("adding the URI")


def certificate_facts(pem: str) -> CertificateFacts:
    """Validity and serial of the first certificate in `pem`; OpenSslError if there is none."""
    data = pem.encode("ascii")
    crypto = libcrypto()
    crypto.ERR_clear_error()
    bio = _new(crypto.BIO_new_mem_buf(data, len(data)), "BIO_new_mem_buf")
    cert = bn = hex_serial = None
    try:
        cert = crypto.PEM_read_bio_X509(bio, None, None, None)
        if not cert:
            raise _failed("reading the certificate")
        bn = _new(crypto.ASN1_INTEGER_to_BN(crypto.X509_get0_serialNumber(cert), None), "serial")
        hex_serial = _new(crypto.BN_bn2hex(bn), "BN_bn2hex")
        return CertificateFacts(
            not_before=_datetime(crypto.X509_get0_notBefore(cert)),
            not_after=_datetime(crypto.X509_get0_notAfter(cert)),
            # BN_bn2hex prints whole bytes, so a serial whose top nibble is 0
            # would gain a leading "0" the control plane's "%x" does not print.
            serial=format(int(ctypes.string_at(hex_serial), 16), "x"),
        )
    finally:
        if hex_serial:
            crypto.CRYPTO_free(hex_serial, b"", 0)
        if bn:
            crypto.BN_free(bn)
        if cert:
            crypto.X509_free(cert)
        crypto.BIO_free(bio)


def _datetime(asn1_time: int | None) -> datetime.datetime:
    tm = _Tm()
    if not asn1_time or libcrypto().ASN1_TIME_to_tm(asn1_time, ctypes.byref(tm)) != 1:
        raise _failed("reading a certificate time")
    return datetime.datetime(
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        tzinfo=datetime.UTC,
    )
