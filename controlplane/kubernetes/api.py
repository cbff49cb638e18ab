"""The thin layer over the `kubernetes` client: a configured ApiClient, JSON in and out.

Every call asks for the raw response (`_preload_content=False`) and parses
the JSON itself, so the rest of the control plane sees objects exactly as
the API server sends them (plain dicts, camelCase), the form the pure
translation and weir_common.kubernetes read. The client's calls block: the
callers run them in threads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from kubernetes import client, config

from weir_common.errors import NodeSetupError

# Six long-lived watches, plus TokenReviews and pod reads running side by side.
CONNECTION_POOL_SIZE: Final = 32
# Bounds every call that is not a watch: (connect, read) seconds.
REQUEST_TIMEOUT: Final = (10.0, 30.0)

ApiException = client.exceptions.ApiException


def new_api_client(kubeconfig: Path | None) -> Any:  # noqa: ANN401 (the client is untyped)
    """An ApiClient for `kubeconfig`, else for the in-cluster ServiceAccount."""
    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), client_configuration=configuration
            )
        else:
            # Re-reads the projected token when the kubelet rotates it.
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except (config.ConfigException, OSError, ValueError) as exc:
        where = str(kubeconfig) if kubeconfig else "the in-cluster service account"
        raise NodeSetupError(
            f"cannot load the Kubernetes client config from {where}: {exc}"
        ) from exc
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    return client.ApiClient(configuration)


def call_json(function: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:  # noqa: ANN401
    """The JSON body of a (non-watch) call; raises ApiException on an HTTP error."""
    response = function(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    try:
        body = json.loads(response.data)
    finally:
        response.release_conn()
    if not isinstance(body, dict):
        raise TypeError(f"the API server answered {type(body).__name__}, not an object")
    return body


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an API error, None for anything else (network, timeout)."""
    return exc.status if isinstance(exc, ApiException) else None


def describe(exc: BaseException) -> str:
    """One line for a log: the API's reason and message when there is one, never a body dump."""
    if isinstance(exc, ApiException):
        try:
            body = json.loads(exc.body or "{}")
        except ValueError:
            body = {}
        message = body.get("message") if isinstance(body, dict) else None
        return f"HTTP {exc.status} {exc.reason}" + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}"
