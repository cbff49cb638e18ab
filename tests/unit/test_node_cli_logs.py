"""`weir node logs`: the bounded ring behind /logs, the route, and how records are merged."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from node_agent.admin import log_ring
from node_agent.admin.log_ring import LogRing
from node_agent.admin.server import AdminRegistry, HttpEndpoint
from node_agent.node_cli import register
from node_agent.node_cli.logs import CNI_LOGGER, merge, split_agent
from tests.netns import node_cli_schemas as schemas
from tests.unit.test_admin_server import get, run


def _record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_the_ring_keeps_only_the_newest_records_in_order():
    ring = LogRing(capacity=3)
    for i in range(5):
        ring.emit(_record("weir.x", logging.INFO, "event %d", i))
    assert [r["message"] for r in ring.recent(10)] == ["event 2", "event 3", "event 4"]
    assert [r["message"] for r in ring.recent(2)] == ["event 3", "event 4"]
    assert ring.recent(0) == []
    first = ring.recent(1)[0]
    assert (first["level"], first["logger"]) == ("info", "weir.x")
    assert first["time"].endswith("+00:00")


def test_an_exception_is_kept_as_one_line_not_a_traceback():
    ring = LogRing()
    error = ValueError("bad thing")
    exc_info = (ValueError, error, None)
    ring.emit(logging.LogRecord("weir.x", logging.ERROR, __file__, 1, "failed", (), exc_info))
    assert ring.recent(1)[0]["message"] == "failed (ValueError: bad thing)"


def test_logs_route_serves_what_the_process_logged_and_refuses_bad_counts():
    (s1, _), (s2, bad), (s3, _) = run(
        AdminRegistry(), True, get("/logs"), get("/logs?lines=x"), get("/logs?lines=1001")
    )
    # The ring is attached once an admin listener exists; what is logged since is served.
    logging.getLogger("weir_test_logs").warning("hello %s", "ring")
    ((s4, after),) = run(AdminRegistry(), True, get("/logs?lines=5"))
    assert s1 == s4 == 200
    assert 0 < len(after["records"]) <= 5
    assert after["records"][-1]["message"] == "hello ring"
    assert after["records"][-1]["level"] == "warning"
    assert (s2, s3) == (400, 400)
    assert "1 to 1000" in bad["error"]
    assert log_ring.process_ring() is log_ring.process_ring()


def test_the_health_listener_does_not_serve_logs():
    ((status, _),) = run(AdminRegistry(), False, get("/logs"))
    assert status == 404


def test_the_agents_records_are_split_into_its_own_and_weir_cnis():
    records = [
        {"time": "t1", "level": "info", "logger": "node_agent.agent", "message": "up"},
        {"time": "t2", "level": "info", "logger": CNI_LOGGER, "message": "ADD default/a"},
    ]
    split = split_agent(records)
    assert [r["message"] for r in split["agent"]] == ["up"]
    assert [(r["component"], r["message"]) for r in split["cni"]] == [("cni", "ADD default/a")]


def test_merge_keeps_the_newest_of_the_wanted_components_in_time_order():
    by = {
        "agent": [{"time": "2026-01-01T00:00:01.000+00:00", "message": "a1"},
                  {"time": "2026-01-01T00:00:04.000+00:00", "message": "a2"}],
        "proxy": [{"time": "2026-01-01T00:00:02.000+00:00", "message": "p1"},
                  {"time": "2026-01-01T00:00:03.000+00:00", "message": "p2"}],
        "cni": [{"time": "2026-01-01T00:00:05.000+00:00", "message": "c1"}],
    }  # fmt: skip
    assert [r["message"] for r in merge(by, ["agent", "proxy"], 3)] == ["p1", "p2", "a2"]
    assert [r["message"] for r in merge(by, ["cni"], 10)] == ["c1"]
    assert merge(by, ["proxy"], 1) == [by["proxy"][1]]


@pytest.fixture
def admin_port() -> Iterator[int]:
    """A real admin listener on loopback, served from a thread of its own."""
    loop = asyncio.new_event_loop()
    endpoint = HttpEndpoint(AdminRegistry(), "127.0.0.1", 0, admin=True)
    loop.run_until_complete(endpoint.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield endpoint.port
    finally:
        asyncio.run_coroutine_threadsafe(endpoint.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_logs_command_reads_the_admin_listeners_and_separates_weir_cni(admin_port, capsys):
    logging.getLogger("node_agent.agent").warning("agent said %d", 1)
    logging.getLogger(CNI_LOGGER).warning("default/a: ADD")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    ports = ["--agent-admin", str(admin_port), "--proxy-admin", str(admin_port)]

    args = parser.parse_args(["node", "logs", "--component", "cni", "-o", "json", *ports])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert schemas.errors(data, schemas.LOGS) == []
    assert [(r["component"], r["message"]) for r in data["records"]][-1:] == [
        ("cni", "default/a: ADD")
    ]
    assert {r["component"] for r in data["records"]} == {"cni"}
    assert "keeps no log file" in data["sources"]["cni"]

    args = parser.parse_args(["node", "logs", "--lines", "2", *ports])
    assert args.func(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["TIME", "COMPONENT", "LEVEL", "LOGGER", "MESSAGE"]
    assert len([line for line in table[1:] if line.startswith("20")]) == 2


def test_an_unreachable_proxy_is_a_problem_and_the_agents_records_still_show(admin_port, capsys):
    logging.getLogger("node_agent.agent").warning("still here")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["node", "logs", "-o", "json", "--agent-admin", str(admin_port), "--proxy-admin", "1"]
    )
    assert args.func(args) == 1
    data = json.loads(capsys.readouterr().out)
    assert schemas.errors(data, schemas.LOGS) == []
    assert data["records"][-1]["message"] == "still here"
    assert len(data["problems"]) == 1 and "proxy admin" in data["problems"][0]
