"""The mesh root CA in Kubernetes: Secret `weir-ca`, its certificate in ConfigMap `weir-ca-root`.

The first replica to start finds no Secret, generates a root and creates the
Secret; when two start together, the API server lets one create win and the
other gets 409 Conflict and reads the winner's, so both sign with the same
root. Then the root certificate is published (created, or updated if it
differs) in the ConfigMap that agents and proxies mount to verify the
control plane. The private key only ever goes to the Secret; it is never
logged. The object bodies and their parsing are pure; `load_or_create_root_secret`
is the thin adapter that applies them (blocking: run it in a thread).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
from collections.abc import Mapping
from typing import Any, Final

from kubernetes import client

from controlplane.ca import CertificateAuthority, generate_root, root_authority
from controlplane.kubernetes.api import call_json, status_of
from weir_common.errors import InvalidInputError

log = logging.getLogger(__name__)

SECRET_NAME: Final = "weir-ca"  # noqa: S105 (a name, not a secret)
CA_CERT_KEY: Final = "ca-cert.pem"
CA_KEY_KEY: Final = "ca-key.pem"
CONFIGMAP_NAME: Final = "weir-ca-root"
ROOT_CERT_KEY: Final = "root-cert.pem"
_LABELS: Final = {"app.kubernetes.io/part-of": "weir"}


def secret_body(namespace: str, cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": namespace, "labels": dict(_LABELS)},
        "type": "Opaque",
        # The root must not change under running workloads by accident.
        "immutable": True,
        "data": {
            CA_CERT_KEY: base64.b64encode(cert_pem).decode(),
            CA_KEY_KEY: base64.b64encode(key_pem).decode(),
        },
    }


def configmap_body(namespace: str, cert_pem: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP_NAME, "namespace": namespace, "labels": dict(_LABELS)},
        "data": {ROOT_CERT_KEY: cert_pem.decode()},
    }


def root_from_secret(secret: Mapping[str, Any]) -> tuple[bytes, bytes, CertificateAuthority]:
    """(certificate PEM, key PEM, CA) from the Secret as the API returns it."""
    meta = secret.get("metadata") or {}
    where = f"Secret {meta.get('namespace', '')}/{meta.get('name', SECRET_NAME)}"
    data = secret.get("data") or {}
    values = []
    for key in (CA_CERT_KEY, CA_KEY_KEY):
        if not isinstance(data.get(key), str):
            raise InvalidInputError(f"{where} has no {key}; restore it or delete the Secret")
        try:
            values.append(base64.b64decode(data[key], validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{where}: {key} is not base64") from None
    cert_pem, key_pem = values
    return cert_pem, key_pem, root_authority(cert_pem, key_pem, source=where)


def load_or_create_root_secret(
    api_client: Any,  # noqa: ANN401 (the client is untyped)
    namespace: str,
    trust_domain: str,
    *,
    now: datetime.datetime,
) -> CertificateAuthority:
    """Read (or create) Secret weir-ca, then publish its certificate in ConfigMap weir-ca-root."""
    core = client.CoreV1Api(api_client)
    try:
        secret = call_json(core.read_namespaced_secret, SECRET_NAME, namespace)
    except Exception as exc:
        if status_of(exc) != 404:
            raise
        cert_pem, key_pem = generate_root(trust_domain, now=now)
        try:
            secret = call_json(
                core.create_namespaced_secret, namespace, secret_body(namespace, cert_pem, key_pem)
            )
            log.info("created the mesh root CA in Secret %s/%s", namespace, SECRET_NAME)
        except Exception as create_exc:
            if status_of(create_exc) != 409:
                raise
            log.info("another replica created Secret %s/%s first; using it", namespace, SECRET_NAME)
            secret = call_json(core.read_namespaced_secret, SECRET_NAME, namespace)
    cert_pem, _, ca = root_from_secret(secret)
    publish_root(core, namespace, cert_pem)
    return ca


def publish_root(core: Any, namespace: str, cert_pem: bytes) -> None:  # noqa: ANN401
    body = configmap_body(namespace, cert_pem)
    try:
        call_json(core.create_namespaced_config_map, namespace, body)
    except Exception as exc:
        if status_of(exc) != 409:
            raise
    else:
        log.info("published the root certificate in ConfigMap %s/%s", namespace, CONFIGMAP_NAME)
        return
    current = call_json(core.read_namespaced_config_map, CONFIGMAP_NAME, namespace)
    if (current.get("data") or {}).get(ROOT_CERT_KEY) != body["data"][ROOT_CERT_KEY]:
        # An update carrying the resourceVersion read: a concurrent writer makes it fail (409).
        meta = current.get("metadata") or {}
        body["metadata"]["resourceVersion"] = meta.get("resourceVersion", "")
        call_json(core.replace_namespaced_config_map, CONFIGMAP_NAME, namespace, body)
        log.info("updated the root certificate in ConfigMap %s/%s", namespace, CONFIGMAP_NAME)
