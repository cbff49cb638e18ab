"""Admin and health endpoints over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json

import pytest

from node_agent.admin import server
from node_agent.admin.server import AdminRegistry, HttpEndpoint


async def fetch(port: int, request: bytes) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def run(registry: AdminRegistry, admin: bool, *requests: bytes) -> list[tuple[int, dict]]:
    async def scenario() -> list[tuple[int, dict]]:
        endpoint = HttpEndpoint(registry, "127.0.0.1", 0, admin=admin)
        await endpoint.start()
        try:
            return [await fetch(endpoint.port, r) for r in requests]
        finally:
            await endpoint.close()

    return asyncio.run(scenario())


def test_config_dump_gathers_every_section_and_one_on_request():
    registry = AdminRegistry()
    registry.add_section("pods", lambda: [{"uid": "u1", "captured": True}])
    registry.add_section("backend", lambda: {"mode": "iptables"})
    (s1, all_), (s2, one), (s3, missing) = run(
        registry,
        True,
        get("/config_dump"),
        get("/config_dump?section=backend"),
        get("/config_dump?section=nope"),
    )
    assert (s1, all_) == (
        200,
        {"backend": {"mode": "iptables"}, "pods": [{"captured": True, "uid": "u1"}]},
    )
    assert (s2, one) == (200, {"backend": {"mode": "iptables"}})
    assert (s3, missing) == (404, {"error": "no section 'nope'"})


def test_readiness_lists_every_reason_until_all_checks_pass():
    registry = AdminRegistry()
    state = {"proxy": False}
    registry.add_readiness("proxy", lambda: None if state["proxy"] else "no proxy connected")
    registry.add_readiness("config", lambda: None)
    [(status, body)] = run(registry, False, get("/healthz/ready"))
    assert status == 503
    assert body == {"status": "not ready", "reasons": {"proxy": "no proxy connected"}}
    state["proxy"] = True
    assert run(registry, False, get("/healthz/ready")) == [(200, {"status": "ready"})]


def test_health_listener_does_not_serve_config_dump():
    registry = AdminRegistry()
    registry.add_section("secretish", lambda: {"pods": 3})
    [(status, _)] = run(registry, False, get("/config_dump"))
    assert status == 404


def test_bad_requests_get_clear_statuses_and_the_server_keeps_serving():
    registry = AdminRegistry()
    registry.add_section("broken", lambda: 1 / 0)
    results = run(
        registry,
        True,
        b"POST /config_dump HTTP/1.1\r\n\r\n",
        b"garbage\r\n\r\n",
        get("/config_dump"),
        get("/healthz"),
    )
    assert [status for status, _ in results] == [405, 400, 500, 200]
    assert results[2][1] == {"error": "handler for /config_dump failed"}


def test_a_section_name_is_registered_once():
    registry = AdminRegistry()
    registry.add_section("pods", dict)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add_section("pods", dict)


def test_the_version_is_the_installed_distributions_without_importlib_metadata():
    import importlib.metadata  # noqa: PLC0415 - what the server no longer imports

    assert server.installed_version("weir") == importlib.metadata.version("weir")
    assert server.installed_version("no-such-distribution-here") is None
