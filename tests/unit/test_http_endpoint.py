"""weir_common.http_endpoint over real HTTP on loopback."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from weir_common.http_endpoint import HttpEndpoint, Query, Reply, text


def echo(query: Query) -> Reply:
    return text(",".join(f"{k}={v}" for k, v in sorted(query.items())) + "\n")


def broken(_query: Query) -> Reply:
    raise RuntimeError("bug")


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return reply


def run(*requests: bytes) -> list[bytes]:
    async def scenario() -> list[bytes]:
        endpoint = HttpEndpoint({"/echo": echo, "/broken": broken})
        port = await endpoint.start()
        assert port == endpoint.port
        try:
            return [await exchange(port, r) for r in requests]
        finally:
            await endpoint.close()

    return asyncio.run(scenario())


def test_routes_answer_with_their_status_type_and_body_and_see_the_query():
    [reply] = run(b"GET /echo?b=2&a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.0 200 OK"
    assert b"Content-Type: text/plain" in head
    assert b"Content-Length: 8" in head
    assert body == b"a=1,b=2\n"


def test_errors_are_answered_and_the_server_keeps_serving():
    replies = run(
        b"GET /nope HTTP/1.1\r\n\r\n",
        b"POST /echo HTTP/1.1\r\n\r\n",
        b"garbage\r\n\r\n",
        b"GET /broken HTTP/1.1\r\n\r\n",
        b"GET /echo HTTP/1.0\r\n\r\n",
    )
    statuses = [int(r.split()[1]) for r in replies]
    assert statuses == [
        HTTPStatus.NOT_FOUND,
        HTTPStatus.METHOD_NOT_ALLOWED,
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.INTERNAL_SERVER_ERROR,
        HTTPStatus.OK,
    ]
    assert replies[0].endswith(b"\r\n\r\nnot found\n")


def test_a_request_head_past_the_bound_is_dropped_unanswered():
    [reply] = run(b"GET /echo?" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n")
    assert reply == b""
