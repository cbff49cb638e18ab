"""ktls: what a node's kernel and OpenSSL give, said the way the proxy logs it."""

from __future__ import annotations

import ssl

from node_agent.proxy import ktls


def test_a_kernel_without_ulps_or_without_the_tls_ulp_keeps_tls_in_openssl() -> None:
    missing = ktls.assess(available_ulps=None, openssl_version=(3, 2, 0), tls13=True)
    assert missing.startswith("kernel TLS off") and "missing" in missing
    no_tls = ktls.assess(available_ulps="mptcp\n", openssl_version=(3, 2, 0), tls13=True)
    assert no_tls.startswith("kernel TLS off") and "available: mptcp" in no_tls
    empty = ktls.assess(available_ulps="\n", openssl_version=(3, 2, 0), tls13=True)
    assert "available: none" in empty


def test_openssl_30_gives_tls13_transmit_only() -> None:
    line = ktls.assess(available_ulps="mptcp tls", openssl_version=(3, 0, 19), tls13=True)
    assert line.startswith("kernel TLS for transmit only") and "OpenSSL 3.0.19" in line


def test_both_ways_with_a_new_openssl_or_tls12() -> None:
    for version, tls13 in (((3, 2, 0), True), ((3, 0, 19), False)):
        line = ktls.assess(available_ulps="tls", openssl_version=version, tls13=tls13)
        assert line.startswith("kernel TLS both ways")


def test_the_option_is_set_and_the_context_reports_this_host() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert ktls.status(context).startswith("kernel TLS off: not enabled")
    ktls.enable(context)
    assert context.options & ktls.SSL_OP_ENABLE_KTLS
    try:
        ulps: str | None = ktls.AVAILABLE_ULP_FILE.read_text()
    except FileNotFoundError:
        ulps = None
    expected = ktls.assess(available_ulps=ulps, openssl_version=ktls.openssl_version(), tls13=True)
    assert ktls.status(context) == expected


def test_the_openssl_version_has_its_patch_number() -> None:
    major, minor, patch = ktls.openssl_version()
    assert (major, minor) == ssl.OPENSSL_VERSION_INFO[:2]
    assert str(patch) in ssl.OPENSSL_VERSION
