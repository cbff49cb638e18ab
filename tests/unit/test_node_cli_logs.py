"""`weir node logs`: the bounded ring behind /logs, the route, and how records are merged."""

from __future__ import annotations

import logging

from node_agent.admin import log_ring
from node_agent.admin.log_ring import LogRing
from node_agent.admin.server import AdminRegistry
from node_agent.node_cli.logs import CNI_LOGGER, merge, split_agent
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
