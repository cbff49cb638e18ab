"""The small HTTP server behind health, readiness, metrics and debug dumps.

One request per connection, answered from a table of routes and closed:
these endpoints serve probes, Prometheus and people with curl, never
traffic, so there is no keep-alive, no request body and nothing to parse
beyond the request line. GET only reads; what changes state (a log level, a
stop) is a separate table of POST routes, parameters in the query string, so
a crawler or a prefetching browser cannot trigger it. The request head is
bounded and must arrive within a deadline; a head past the bound is dropped
without an answer, as is one that never completes. It runs on the caller's
asyncio loop, so routes read the state they report without crossing
threads, and listens on loopback unless told. A route may answer later (a
coroutine): one that gathers what other processes report.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Final

log = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
MAX_REQUEST_HEAD: Final = 8192
READ_TIMEOUT_SECONDS: Final = 5.0

Query = Mapping[str, str]
# What a route answers: status, content type, body.
Reply = tuple[HTTPStatus, str, bytes]
Route = Callable[[Query], Reply | Awaitable[Reply]]
# How an endpoint words the answers it gives itself (404, 405, 400, 500):
# (status, what went wrong) -> content type and body.
ErrorBody = Callable[[HTTPStatus, str], tuple[str, bytes]]

_PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4"


def text(body: str, status: HTTPStatus = HTTPStatus.OK, content_type: str = "text/plain") -> Reply:
    return status, content_type, body.encode()


def readiness(ready: Callable[[], bool]) -> Route:
    """/healthz/ready as probes read it: 200 "ready" or 503 "not ready"."""

    def route(_query: Query) -> Reply:
        if ready():
            return text("ready\n")
        return text("not ready\n", HTTPStatus.SERVICE_UNAVAILABLE)

    return route


def prometheus(render: Callable[[], str | Awaitable[str]]) -> Route:
    """/metrics in the Prometheus text format (`render` may gather it from elsewhere first)."""

    async def route(_query: Query) -> Reply:
        body = render()
        if inspect.isawaitable(body):
            body = await body
        return text(body, content_type=_PROMETHEUS_TEXT)

    return route


def plain_error(status: HTTPStatus, _message: str) -> tuple[str, bytes]:
    """ "not found\\n" and the like: what a probe or curl needs, nothing about our routes."""
    return "text/plain", f"{status.phrase.lower()}\n".encode()


class HttpEndpoint:
    """Serves `routes` (path without query -> route) once started, until closed."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        post_routes: Mapping[str, Route] | None = None,
        error_body: ErrorBody = plain_error,
    ) -> None:
        self._routes = routes
        self._post_routes = post_routes or {}
        self._error_body = error_body
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("endpoint not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str = LOOPBACK, port: int = 0, *, reuse_port: bool = False) -> int:
        """Listen on `host`:`port` (0: any free port); the port listened on.

        `reuse_port` lets a successor process of the same user listen on the
        same port while this one still runs (a rolling update's overlap).
        """
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=MAX_REQUEST_HEAD, reuse_port=reuse_port or None
        )
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                # The reader's limit bounds the head: LimitOverrunError past it.
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = await self._respond(head)
            writer.write(
                f"HTTP/1.0 {status.value} {status.phrase}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            ConnectionError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as e:
            log.debug("HTTP request dropped: %r", e)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> Reply:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._error(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target = parts[0], parts[1]
        tables = {"GET": self._routes, "POST": self._post_routes}
        if method not in tables:
            return self._error(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and POST are served")
        path, _, query = target.partition("?")
        route = tables[method].get(path)
        if route is None:
            if any(path in table for table in tables.values()):
                return self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {path} is not served")
            return self._error(HTTPStatus.NOT_FOUND, f"no endpoint {path}")
        try:
            reply = route(dict(p.partition("=")[::2] for p in query.split("&") if p))
            return await reply if inspect.isawaitable(reply) else reply
        except Exception:
            log.exception("HTTP handler for %s failed", target)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"handler for {target} failed")

    def _error(self, status: HTTPStatus, message: str) -> Reply:
        content_type, body = self._error_body(status, message)
        return status, content_type, body
