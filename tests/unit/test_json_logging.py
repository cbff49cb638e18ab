"""Structured logs: every line is one JSON object with exactly the documented fields.

The formatter is driven through a private logger; `weir --log-format json`
and the uncaught-exception hooks run in a subprocess, since they configure
the process's root logger.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from weir_cli import _chosen
from weir_common.json_logging import FIELDS, REDACTED, JsonFormatter, configure

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TOKEN = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0.sig"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("agent"))
    logger = logging.getLogger("weir.test.json_logging")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed on its own: a line that is not one JSON object fails here."""
    out = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        out.append(entry)
    return out


def check_common(entry: dict[str, Any], component: str) -> None:
    assert list(entry)[: len(FIELDS)] == list(FIELDS)
    assert RFC3339_UTC.fullmatch(entry["time"]), entry["time"]
    assert entry["level"] in {"debug", "info", "warning", "error", "critical"}
    assert entry["component"] == component


def test_every_line_has_exactly_the_documented_fields(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    logger.info("enrolled %s (%s capture)", "shop/web", "iptables")
    logger.debug("line one\nline two\u2028still the same record")
    logger.warning("retrying", extra={"pod": "shop/web", "attempt": 2, "ips": ("10.0.0.5",)})
    logger.info("an object", extra={"path": object()})
    try:
        json.loads("{bad push")
    except ValueError:
        logger.exception("the config handler failed")
    logger.error("where", stack_info=True)
    logger.info("colliding", extra={"level": "mine", "component": "other", "exception": "no"})

    entries = lines(stream.getvalue())
    assert len(entries) == 7
    for entry in entries:
        check_common(entry, "agent")
        assert entry["logger"] == "weir.test.json_logging"
    expected_keys = [
        set(FIELDS),
        set(FIELDS),
        {*FIELDS, "pod", "attempt", "ips"},
        {*FIELDS, "path"},
        {*FIELDS, "exception"},
        {*FIELDS, "stack"},
        {*FIELDS, "extra_level", "extra_component", "extra_exception"},
    ]
    assert [set(entry) for entry in entries] == expected_keys
    assert entries[0]["message"] == "enrolled shop/web (iptables capture)"
    assert entries[0]["level"] == "info"
    assert entries[1]["message"] == "line one\nline two\u2028still the same record"
    assert entries[2]["attempt"] == 2 and entries[2]["ips"] == ["10.0.0.5"]
    assert entries[3]["path"].startswith("<object object at ")
    assert entries[4]["level"] == "error"
    assert "JSONDecodeError: Expecting property name" in entries[4]["exception"]
    assert entries[4]["exception"].startswith("Traceback (most recent call last):")
    assert "test_json_logging.py" in entries[5]["stack"]
    assert entries[6]["level"] == "info" and entries[6]["extra_level"] == "mine"


def test_extras_named_like_credentials_are_redacted(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    logger.info(
        "calling the control plane",
        extra={
            "token": TOKEN,
            "authorization": f"Bearer {TOKEN}",
            "private_key_pem": "-----BEGIN PRIVATE KEY-----",
            "node": "n1",
        },
    )
    text = stream.getvalue()
    assert TOKEN not in text and "BEGIN PRIVATE KEY" not in text
    (entry,) = lines(text)
    assert entry["token"] == entry["authorization"] == entry["private_key_pem"] == REDACTED
    assert entry["node"] == "n1"


def test_configure_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format 'xml' is not one of text, json"):
        configure("info", "xml", "agent")


def run_weir(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys, weir_cli; sys.exit(weir_cli.main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_weir_log_format_json_writes_only_json_lines_on_stderr() -> None:
    result = run_weir(
        "--log-format", "json", "--log-level", "debug", "redirect", "check", "--netns", "/nonexist"
    )
    assert result.returncode == 1
    entries = lines(result.stderr)
    assert entries, result.stderr
    for entry in entries:
        check_common(entry, "redirect")
        assert set(entry) == set(FIELDS)
    assert entries[-1]["level"] == "error"
    assert entries[-1]["message"] == "network namespace /nonexist does not exist"


def test_text_stays_the_default() -> None:
    result = run_weir("redirect", "check", "--netns", "/nonexist")
    assert result.returncode == 1
    assert result.stderr == "weir: error: network namespace /nonexist does not exist\n"


def test_uncaught_exceptions_become_json_records_too() -> None:
    code = (
        "import threading\n"
        "from weir_common.json_logging import configure\n"
        "configure('info', 'json', 'proxy')\n"
        "def boom():\n"
        "    raise RuntimeError('in a thread')\n"
        "t = threading.Thread(target=boom, name='worker')\n"
        "t.start(); t.join()\n"
        "raise KeyError('in main')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    entries = lines(result.stderr)
    assert [entry["message"] for entry in entries] == [
        "uncaught exception in thread worker",
        "uncaught exception",
    ]
    for entry in entries:
        check_common(entry, "proxy")
        assert set(entry) == {*FIELDS, "exception"}
        assert entry["level"] == "critical"
    assert "RuntimeError: in a thread" in entries[0]["exception"]
    assert "KeyError: 'in main'" in entries[1]["exception"]


def test_a_thread_that_exits_with_systemexit_logs_nothing() -> None:
    code = (
        "import sys, threading\n"
        "from weir_common.json_logging import configure\n"
        "configure('info', 'json', 'agent')\n"
        "t = threading.Thread(target=sys.exit)\n"
        "t.start(); t.join()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert result.stderr == ""


def test_the_subcommand_is_found_past_log_format() -> None:
    assert _chosen(["--log-format", "json", "agent", "--node", "n1"]) == "agent"
