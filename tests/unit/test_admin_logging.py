"""/logging, /quitquitquit and the loopback rule of the admin listener, over real HTTP."""

from __future__ import annotations

import argparse
import logging

import pytest

from node_agent.admin.server import AdminRegistry, HttpEndpoint
from node_agent.proxy.cli import parse_loopback_listen
from tests.unit.test_admin_server import get, run
from weir_common.errors import InvalidInputError

COMPONENTS = {"root": "", "thing": "weir_test_admin.thing"}


def post(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


@pytest.fixture
def registry():
    thing = logging.getLogger(COMPONENTS["thing"])
    yield AdminRegistry(log_components=COMPONENTS)
    thing.setLevel(logging.NOTSET)


def test_a_level_changed_through_logging_is_in_force_at_once(registry):
    thing = logging.getLogger(COMPONENTS["thing"])
    assert not thing.isEnabledFor(logging.DEBUG)
    (s1, before), (s2, after), (s3, read) = run(
        registry, True, get("/logging"), post("/logging?thing=debug"), get("/logging")
    )
    assert (s1, s2, s3) == (200, 200, 200)
    assert before["thing"] == before["root"]
    assert after == read == {"root": before["root"], "thing": "debug"}
    assert thing.isEnabledFor(logging.DEBUG)


def test_a_bad_component_or_level_changes_nothing(registry):
    results = run(
        registry,
        True,
        post("/logging?thing=debug&nope=info"),
        post("/logging?thing=loud"),
        post("/logging"),
        get("/logging?thing=debug"),
    )
    assert [status for status, _ in results] == [400, 400, 400, 200]
    assert "no component 'nope'" in results[0][1]["error"]
    assert "'loud' is not one of" in results[1][1]["error"]
    # GET never changes a level, whatever its query says.
    assert results[3][1]["thing"] != "debug"
    assert logging.getLogger(COMPONENTS["thing"]).level == logging.NOTSET


def test_quitquitquit_is_a_post_that_stops_the_process():
    stops: list[int] = []
    registry = AdminRegistry(on_quit=lambda: stops.append(1))
    results = run(registry, True, get("/quitquitquit"), post("/quitquitquit"))
    assert [status for status, _ in results] == [405, 200]
    assert results[1][1] == {"status": "stopping"}
    assert stops == [1]


def test_the_health_listener_serves_neither_logging_nor_quit():
    stops: list[int] = []
    registry = AdminRegistry(log_components=COMPONENTS, on_quit=lambda: stops.append(1))
    results = run(
        registry, False, get("/logging"), post("/logging?thing=debug"), post("/quitquitquit")
    )
    assert [status for status, _ in results] == [404, 404, 404]
    assert stops == []


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::"])
def test_the_admin_listener_refuses_an_address_off_loopback(host):
    with pytest.raises(InvalidInputError, match="must be on loopback"):
        HttpEndpoint(AdminRegistry(), host, 0, admin=True)


def test_the_proxys_admin_flag_takes_only_loopback():
    assert parse_loopback_listen("127.0.0.1:15019") == ("127.0.0.1", 15019)
    assert parse_loopback_listen("[::1]:15019") == ("::1", 15019)
    for bad in ("0.0.0.0:15019", "10.0.0.1:15019", "localhost:15019", "127.0.0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_loopback_listen(bad)
