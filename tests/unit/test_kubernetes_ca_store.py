"""The root CA's Secret and ConfigMap bodies, and reading a root back from a Secret."""

import base64
import datetime

import pytest

from controlplane.ca import generate_root
from controlplane.kubernetes.ca_store import configmap_body, root_from_secret, secret_body
from weir_common.errors import InvalidInputError

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_secret_round_trip_and_configmap_carry_the_same_root():
    cert_pem, key_pem = generate_root("cluster.local", now=NOW)
    secret = secret_body("weir-system", cert_pem, key_pem)
    assert secret["metadata"] == {
        "name": "weir-ca",
        "namespace": "weir-system",
        "labels": {"app.kubernetes.io/part-of": "weir"},
    }
    assert secret["immutable"] is True
    assert set(secret["data"]) == {"ca-cert.pem", "ca-key.pem"}
    cert_back, key_back, ca = root_from_secret(secret)
    assert (cert_back, key_back) == (cert_pem, key_pem)
    assert ca.trust_bundle_pem == [cert_pem.decode()]
    configmap = configmap_body("weir-system", cert_pem)
    assert configmap["metadata"]["name"] == "weir-ca-root"
    assert configmap["data"] == {"root-cert.pem": cert_pem.decode()}
    assert b"PRIVATE" not in str(configmap).encode()


def _with(secret, **data):
    return {**secret, "data": {**secret["data"], **data}}


def test_bad_secrets_are_refused_without_quoting_the_key():
    cert_pem, key_pem = generate_root("cluster.local", now=NOW)
    other_cert, _ = generate_root("cluster.local", now=NOW)
    secret = secret_body("weir-system", cert_pem, key_pem)
    no_key = {**secret, "data": {"ca-cert.pem": secret["data"]["ca-cert.pem"]}}
    cases = {
        "has no ca-key.pem": no_key,
        "is not base64": _with(secret, **{"ca-key.pem": "%%%"}),
        "is not the certificate's": _with(
            secret, **{"ca-cert.pem": base64.b64encode(other_cert).decode()}
        ),
        "cannot load the root": _with(secret, **{"ca-key.pem": base64.b64encode(b"junk").decode()}),
    }
    for words, bad in cases.items():
        with pytest.raises(InvalidInputError) as error:
            root_from_secret(bad)
        assert words in error.value.message
        assert "Secret weir-system/weir-ca" in error.value.message
        assert key_pem.decode().splitlines()[1] not in error.value.message
