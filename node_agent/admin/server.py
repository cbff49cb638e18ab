"""A small HTTP/1.1 server for the admin and health endpoints.

Each subsystem registers a `config_dump` section (a function returning plain
data) and, if it gates readiness, a readiness check; the debugging CLI reads
the same handlers, so what `weir node ...` shows is what the endpoint
serves. The server itself is weir_common.http_endpoint; here its answers,
including its errors, are JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from weir_common import http_endpoint
from weir_common.http_endpoint import Query, Reply, Route

Section = Callable[[], Any]
# A readiness check returns None when ready, else the reason it is not.
ReadinessCheck = Callable[[], str | None]


@dataclass
class AdminRegistry:
    sections: dict[str, Section] = field(default_factory=dict)
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)

    def add_section(self, name: str, section: Section) -> None:
        if name in self.sections:
            raise ValueError(f"config_dump section {name!r} registered twice")
        self.sections[name] = section

    def add_readiness(self, name: str, check: ReadinessCheck) -> None:
        self.readiness[name] = check

    def config_dump(self, only: str | None = None) -> dict[str, Any]:
        names = [only] if only else sorted(self.sections)
        return {name: self.sections[name]() for name in names}

    def not_ready(self) -> dict[str, str]:
        """Reasons per failing check; empty when ready."""
        reasons = {name: check() for name, check in sorted(self.readiness.items())}
        return {name: reason for name, reason in reasons.items() if reason is not None}


def _json(status: HTTPStatus, body: Any) -> Reply:  # noqa: ANN401 - any JSON-able data
    payload = json.dumps(body, indent=2, sort_keys=True, default=str).encode() + b"\n"
    return status, "application/json", payload


def _json_error(status: HTTPStatus, message: str) -> tuple[str, bytes]:
    _, content_type, body = _json(status, {"error": message})
    return content_type, body


def _routes(registry: AdminRegistry, admin: bool) -> dict[str, Route]:
    def ready(_query: Query) -> Reply:
        reasons = registry.not_ready()
        if reasons:
            return _json(
                HTTPStatus.SERVICE_UNAVAILABLE, {"status": "not ready", "reasons": reasons}
            )
        return _json(HTTPStatus.OK, {"status": "ready"})

    def config_dump(query: Query) -> Reply:
        only = query.get("section")
        if only is not None and only not in registry.sections:
            return _json(HTTPStatus.NOT_FOUND, {"error": f"no section {only!r}"})
        return _json(HTTPStatus.OK, registry.config_dump(only))

    routes: dict[str, Route] = {
        "/healthz": lambda _query: _json(HTTPStatus.OK, {"status": "alive"}),
        "/healthz/ready": ready,
    }
    if admin:
        routes["/config_dump"] = config_dump
    return routes


class HttpEndpoint:
    """One listener. `admin=False` serves only health, for a non-loopback address."""

    def __init__(self, registry: AdminRegistry, host: str, port: int, admin: bool) -> None:
        self._host, self._port = host, port
        self._http = http_endpoint.HttpEndpoint(_routes(registry, admin), error_body=_json_error)

    @property
    def port(self) -> int:
        return self._http.port

    async def start(self) -> None:
        await self._http.start(self._host, self._port)

    async def close(self) -> None:
        await self._http.close()
