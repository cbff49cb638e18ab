"""A small HTTP/1.1 server for the admin and health endpoints.

Each subsystem registers a `config_dump` section (a function returning plain
data, or a coroutine of it when the data comes from another process) and,
if it gates readiness, a readiness check; the debugging CLI reads
the same handlers, so what `weir node ...` shows is what the endpoint
serves. The server itself is weir_common.http_endpoint; here its answers,
including its errors, are JSON.

The admin listener (loopback only, refused otherwise) also serves
`/logging` (GET: the level per component; POST `?component=level`: change
it now), `/logs?lines=N` (the process's last N log records, see log_ring) and
POST `/quitquitquit` (a graceful stop, as SIGTERM). The health listener,
which kubelet reaches from off the node, serves only health and the
Prometheus metrics at `/metrics` when the registry has them (both listeners
do: Prometheus scrapes the agent's :15021 as it scrapes the proxy's :15020).
"""

from __future__ import annotations

import datetime
import functools
import inspect
import ipaddress
import json
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from node_agent.admin import log_levels, log_ring
from weir_common import http_endpoint, openssl_runtime
from weir_common.errors import InvalidInputError
from weir_common.http_endpoint import Query, Reply, Route

Section = Callable[[], Any]
# A readiness check returns None when ready, else the reason it is not.
ReadinessCheck = Callable[[], str | None]


@dataclass
class AdminRegistry:
    sections: dict[str, Section] = field(default_factory=dict)
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    # What /logging may read and change: component -> logger name (see log_levels).
    log_components: Mapping[str, str] = field(default_factory=dict)
    # What /quitquitquit calls: the same graceful stop as SIGTERM. None: not served.
    on_quit: Callable[[], None] | None = None
    # What /metrics serves (Prometheus text). None: not served.
    metrics: Callable[[], str] | None = None
    # Other processes' newest log records, merged into /logs (a proxy's other workers).
    more_logs: Callable[[int], Awaitable[list[dict[str, Any]]]] | None = None

    def add_section(self, name: str, section: Section) -> None:
        if name in self.sections:
            raise ValueError(f"config_dump section {name!r} registered twice")
        self.sections[name] = section

    def add_readiness(self, name: str, check: ReadinessCheck) -> None:
        self.readiness[name] = check

    async def config_dump(self, only: str | None = None) -> dict[str, Any]:
        names = [only] if only else sorted(self.sections)
        dump = {}
        for name in names:
            value = self.sections[name]()
            dump[name] = await value if inspect.isawaitable(value) else value
        return dump

    def not_ready(self) -> dict[str, str]:
        """Reasons per failing check; empty when ready."""
        reasons = {name: check() for name, check in sorted(self.readiness.items())}
        return {name: reason for name, reason in reasons.items() if reason is not None}


_STARTED = time.time()


@functools.cache
def installed_version(distribution: str) -> str | None:
    """`distribution`'s version, from the first METADATA of it on sys.path; None if none.

    Not importlib.metadata: for this one line it brings email, zipfile, csv,
    bz2 and lzma, about 2 MiB of every node proxy's memory.
    """
    for entry in sys.path:
        for metadata in sorted(Path(entry or ".").glob(f"{distribution}-*.dist-info/METADATA")):
            try:
                with metadata.open(encoding="utf-8") as lines:
                    for line in lines:
                        if line.startswith("Version:"):
                            return line.removeprefix("Version:").strip()
                        if not line.strip():  # the headers end here
                            break
            except OSError:
                continue
    return None


def node_info(node: str) -> dict[str, Any]:
    """Who answers: the node, the running version and process, since when."""
    return {
        "node": node,
        "version": installed_version("weir") or "unknown (not installed)",
        "pid": os.getpid(),
        "openssl": f"{ssl.OPENSSL_VERSION} ({openssl_runtime.owner()})",
        "started": datetime.datetime.fromtimestamp(_STARTED, datetime.UTC).isoformat(
            timespec="seconds"
        ),
    }


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

    async def config_dump(query: Query) -> Reply:
        only = query.get("section")
        if only is not None and only not in registry.sections:
            return _json(HTTPStatus.NOT_FOUND, {"error": f"no section {only!r}"})
        return _json(HTTPStatus.OK, await registry.config_dump(only))

    routes: dict[str, Route] = {
        "/healthz": lambda _query: _json(HTTPStatus.OK, {"status": "alive"}),
        "/healthz/ready": ready,
    }
    if registry.metrics is not None:
        routes["/metrics"] = http_endpoint.prometheus(registry.metrics)
    if admin:
        routes["/config_dump"] = config_dump
        routes["/logging"] = lambda _query: _json(
            HTTPStatus.OK, log_levels.levels(registry.log_components)
        )
        routes["/logs"] = _logs_route(log_ring.process_ring(), registry)
    return routes


def _logs_route(ring: log_ring.LogRing, registry: AdminRegistry) -> Route:
    async def logs(query: Query) -> Reply:
        text = query.get("lines", "100")
        if not text.isdigit() or not 0 < int(text) <= log_ring.CAPACITY:
            return _json(
                HTTPStatus.BAD_REQUEST,
                {"error": f"lines={text!r}: a number from 1 to {log_ring.CAPACITY}"},
            )
        lines = int(text)
        records = ring.recent(lines)
        if registry.more_logs is not None:
            # Every process's newest, in time order (same-format UTC stamps sort as text).
            records = sorted([*records, *await registry.more_logs(lines)], key=lambda r: r["time"])
        return _json(HTTPStatus.OK, {"records": records[-lines:]})

    return logs


def _post_routes(registry: AdminRegistry) -> dict[str, Route]:
    def set_logging(query: Query) -> Reply:
        if not query:
            return _json(HTTPStatus.BAD_REQUEST, {"error": "nothing to change: ?component=level"})
        try:
            log_levels.set_levels(registry.log_components, query)
        except InvalidInputError as e:
            return _json(HTTPStatus.BAD_REQUEST, {"error": e.message})
        return _json(HTTPStatus.OK, log_levels.levels(registry.log_components))

    routes: dict[str, Route] = {"/logging": set_logging}
    on_quit = registry.on_quit
    if on_quit is not None:

        def quit_(_query: Query) -> Reply:
            # The stop runs on the loop after this answer is written.
            on_quit()
            return _json(HTTPStatus.OK, {"status": "stopping"})

        routes["/quitquitquit"] = quit_
    return routes


class HttpEndpoint:
    """One listener. `admin=False` serves only health, for a non-loopback address."""

    def __init__(
        self,
        registry: AdminRegistry,
        host: str,
        port: int,
        admin: bool,
        *,
        reuse_port: bool = False,
    ) -> None:
        # The admin routes change log levels and stop the process: nothing off
        # the node may reach them, whatever the configuration says.
        if admin and not ipaddress.ip_address(host).is_loopback:
            raise InvalidInputError(f"the admin listener must be on loopback, not {host}")
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._http = http_endpoint.HttpEndpoint(
            _routes(registry, admin),
            post_routes=_post_routes(registry) if admin else None,
            error_body=_json_error,
        )

    @property
    def port(self) -> int:
        return self._http.port

    async def start(self) -> None:
        await self._http.start(self._host, self._port, reuse_port=self._reuse_port)

    async def close(self) -> None:
        await self._http.close()
