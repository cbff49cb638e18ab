"""bench/capture_modes.py's pure parts: samples from the C client, medians, the table, options."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from bench.capture_modes import (
    METRICS,
    Cpus,
    Settings,
    cpu_flags,
    medians,
    parse_args,
    parse_cpus,
    pinned,
    render_table,
    report,
    sample,
)


def client_doc(
    p50: float = 100.0, p99: float = 200.0, per_s: float = 5000.0, failures: int = 0
) -> dict[str, Any]:
    """capture_client's output, as the C program prints it."""
    return {
        "size": 1,
        "concurrency": 1,
        "connections": 6001,
        "latency": {
            "connects": 1000,
            "ok": 1000 - failures,
            "failures": failures,
            "connect_us": {"p50": 30.0, "p90": 40.0, "p99": 90.0, "max": 400.0},
            "connect_rr_us": {"p50": p50, "p90": 150.0, "p99": p99, "max": 900.0},
        },
        "rate": {"seconds": 1.0, "conns": 5000, "failures": 0, "per_s": per_s},
        "rr": {"seconds": 1.0, "requests": 30000, "failures": 1, "per_s": 30000.0},
    }


def test_sample_takes_every_figure_and_adds_failures_of_all_phases() -> None:
    s = sample(client_doc(failures=2), standin_accepted=6001)
    assert set(s) == set(METRICS)
    assert s == {
        "connect_rr_p50_us": 100.0,
        "connect_rr_p99_us": 200.0,
        "connect_p50_us": 30.0,
        "connect_p99_us": 90.0,
        "conn_per_s": 5000.0,
        "rr_per_s": 30000.0,
        "failures": 3.0,
        "connections": 6001.0,
        "standin_accepted": 6001.0,
    }


def test_sample_of_a_run_where_no_connection_succeeded_is_refused() -> None:
    doc = client_doc()
    doc["latency"]["connect_rr_us"] = {"p50": None, "p90": None, "p99": None, "max": None}
    with pytest.raises(ValueError, match="no connection of the latency phase succeeded"):
        sample(doc, 0)


def test_sample_names_what_the_client_output_lacks() -> None:
    doc = client_doc()
    del doc["rr"]
    with pytest.raises(ValueError, match="lacks 'rr'"):
        sample(doc, 0)


def test_medians_per_figure_and_failures_are_totals() -> None:
    raw = {
        "none": [
            sample(client_doc(p50=v, failures=f), 0) for v, f in ((90, 0), (100, 1), (300, 0))
        ],
        "ebpf": [sample(client_doc(p50=v), 7) for v in (150, 110)],
    }
    med = medians(raw)
    assert med["none"]["connect_rr_p50_us"] == 100
    assert med["none"]["failures"] == 1 + 3  # one latency failure + one rr failure per sample
    assert med["ebpf"]["connect_rr_p50_us"] == 130  # even count: mean of the middle two
    assert med["ebpf"]["standin_accepted"] == 7


def test_medians_refuse_a_mode_without_samples() -> None:
    with pytest.raises(ValueError, match="mode iptables has no samples"):
        medians({"iptables": []})


def test_table_shows_microseconds_added_and_ratios_to_none() -> None:
    raw = {
        "none": [sample(client_doc(p50=100, p99=200, per_s=8000), 0)],
        "iptables": [sample(client_doc(p50=160, p99=500, per_s=4000), 6001)],
        "ebpf": [sample(client_doc(p50=140, p99=300, per_s=5000), 6001)],
    }
    table = render_table(medians(raw), 1, Settings(connects=1000, seconds=1.0))
    lines = table.splitlines()
    assert lines[0].startswith("medians of 1 interleaved repeats; latency over 1000 connects")
    ipt = next(ln for ln in lines if ln.startswith("iptables"))
    assert ipt.split()[1:4] == ["160.0", "500.0", "+60.0"]
    assert "p50 x1.60 p99 x2.50 conn/s x0.50 rr/s x1.00" in ipt
    ebpf = next(ln for ln in lines if ln.startswith("ebpf "))
    assert "+40.0" in ebpf
    assert lines[-1] == (
        "ebpf vs iptables: added us per connection +40.0 vs +60.0, new conn/s x1.25, rr/s x1.00"
    )


def test_report_has_date_machine_command_settings_raw_and_medians() -> None:
    raw = {"none": [sample(client_doc(), 0)], "ebpf": [sample(client_doc(p50=120), 6001)]}
    doc = report(
        raw,
        settings=Settings(connects=500),
        cpus=Cpus(1, 1, 0),
        repeats=1,
        when=datetime.datetime(2026, 11, 30, 6, 0, tzinfo=datetime.UTC),
        machine={"kernel": "6.18", "cpus": 2},
        command=["bench/capture_modes.py", "--connects", "500"],
    )
    assert doc["date"] == "2026-11-30T06:00:00+00:00"
    assert doc["machine"] == {"kernel": "6.18", "cpus": 2}
    assert doc["command"] == ["bench/capture_modes.py", "--connects", "500"]
    assert doc["settings"]["connects"] == 500
    assert doc["settings"]["cpus"] == {"client": 1, "standin": 1, "echo": 0}
    assert doc["raw"]["ebpf"][0]["connect_rr_p50_us"] == 120
    assert doc["medians"]["ebpf"]["connect_rr_p50_us"] == 120
    json.dumps(doc)  # all of it serializable


def test_client_flags_carry_every_setting_and_the_budget_bounds_the_client() -> None:
    settings = Settings(connects=300, seconds=0.5, size=16, concurrency=4)
    flags = settings.client_flags()
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    assert pairs == {
        "--connects": "300",
        "--concurrency": "4",
        "--size": "16",
        "--rate-seconds": "0.5",
        "--rr-seconds": "0.5",
        "--timeout-ms": "2000",
        "--max-seconds": str(int(settings.budget())),
    }
    assert settings.budget() > 2 * settings.seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,1,1", Cpus(1, 1, 1)), ("0,1,0", Cpus(0, 1, 0)), ("none", Cpus(None, None, None))],
)
def test_cpus_parse(text: str, expected: Cpus) -> None:
    assert parse_cpus(text, {0, 1}) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,1", "wants 'client,standin,echo'"),
        ("1,x,1", "wants 'client,standin,echo'"),
        ("-1,1,1", "wants 'client,standin,echo'"),
        ("0,1,5", r"names CPU \[5\] outside"),
    ],
)
def test_bad_cpus_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cpus(text, {0, 1})


def test_pinning_argv_for_the_c_programs_and_for_the_echo_server() -> None:
    assert cpu_flags(1) == ["--cpu", "1"]
    assert cpu_flags(None) == []
    assert pinned(["/bin/echo", "--port", "8080"], 0) == [
        "taskset", "-c", "0", "/bin/echo", "--port", "8080"
    ]  # fmt: skip
    assert pinned(["/bin/echo"], None) == ["/bin/echo"]


def test_unbounded_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--seconds", "100"])
    assert "keep it bounded" in capsys.readouterr().err


def test_json_into_a_missing_directory_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--json", str(tmp_path / "nowhere" / "out.json")])
    assert "does not exist" in capsys.readouterr().err
