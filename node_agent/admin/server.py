"""A small HTTP/1.1 server for the admin and health endpoints.

Each subsystem registers a `config_dump` section (a function returning plain
data) and, if it gates readiness, a readiness check; the debugging CLI reads
the same handlers, so what `weir node ...` shows is what the endpoint
serves. GET only, no keep-alive, bounded request size: this is a debugging
surface, not an API for traffic, and it listens on loopback by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

log = logging.getLogger(__name__)

Section = Callable[[], Any]
# A readiness check returns None when ready, else the reason it is not.
ReadinessCheck = Callable[[], str | None]

_MAX_REQUEST = 8192
_READ_TIMEOUT = 5.0


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


def _route(registry: AdminRegistry, path: str, admin: bool) -> tuple[HTTPStatus, Any]:
    route, _, query = path.partition("?")
    if route == "/healthz":
        return HTTPStatus.OK, {"status": "alive"}
    if route == "/healthz/ready":
        reasons = registry.not_ready()
        if reasons:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "not ready", "reasons": reasons}
        return HTTPStatus.OK, {"status": "ready"}
    if admin and route == "/config_dump":
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        only = params.get("section")
        if only is not None and only not in registry.sections:
            return HTTPStatus.NOT_FOUND, {"error": f"no section {only!r}"}
        return HTTPStatus.OK, registry.config_dump(only)
    return HTTPStatus.NOT_FOUND, {"error": f"no endpoint {route}"}


class HttpEndpoint:
    """One listener. `admin=False` serves only health, for a non-loopback address."""

    def __init__(self, registry: AdminRegistry, host: str, port: int, admin: bool) -> None:
        self._registry = registry
        self._host, self._port, self._admin = host, port, admin
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("endpoint not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await self._respond(reader)
            payload = json.dumps(body, indent=2, sort_keys=True, default=str).encode() + b"\n"
            head = (
                f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + payload)
            await writer.drain()
        except (
            ConnectionError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[HTTPStatus, Any]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
        if len(head) > _MAX_REQUEST:
            return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, {"error": "request too large"}
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return HTTPStatus.BAD_REQUEST, {"error": "malformed request line"}
        method, path = parts[0], parts[1]
        if method != "GET":
            return HTTPStatus.METHOD_NOT_ALLOWED, {"error": "only GET is served"}
        try:
            return _route(self._registry, path, self._admin)
        except Exception:
            log.exception("admin handler for %s failed", path)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"handler for {path} failed"}
