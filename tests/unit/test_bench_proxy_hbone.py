"""bench/proxy_hbone.py's pure parts: options, phase plans, figures, summaries, the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.proxy_hbone import (
    BenchError,
    Phase,
    Result,
    Row,
    Summary,
    add_added_p99,
    add_failure_totals,
    bulk_deadline,
    busy_percent,
    document,
    headroom,
    load_argv,
    number,
    parse_args,
    parse_report,
    phase_figures,
    phases,
    ratio,
    render_table,
    rotated,
    summarize,
    summarize_runs,
)
from bench.proxy_hbone_child import workload_from_json, workload_json
from node_agent.proxy.model import MtlsMode, Workload

CPUS = {0, 1}


# -- options --------------------------------------------------------------------------


def test_defaults() -> None:
    args = parse_args([], CPUS)
    assert (args.repeats, args.seconds, args.bulk_mib) == (5, 5.0, 512)
    assert (args.conns, args.crr_conns, args.size, args.rates) == (32, 32, 1024, [1000, 5000])
    assert (args.harness_cpu, args.middle_cpu, args.pods, args.workers) == (0, (1,), 100, 1)
    assert args.json is None and args.py_spy is None


def test_quick_is_one_short_repeat() -> None:
    args = parse_args(["--quick"], CPUS)
    assert (args.repeats, args.seconds, args.bulk_mib) == (1, 2.0, 128)


def test_quick_and_an_explicit_length_contradict(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--repeats", "3"], CPUS)
    assert "--quick sets --repeats: give one or the other" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "0 must be at least 1"),
        (["--repeats", "two"], "'two' is not an integer"),
        (["--seconds", "0"], "0 s is not in (0, 600]"),
        (["--seconds", "nan"], "nan s is not in (0, 600]"),
        (["--rates", "1000,1000"], "a rate is given twice"),
        (["--rates", "1000,-5"], "-5 must be at least 1"),
        (["--pods", "-1"], "-1 must be 0 or more"),
        (["--pods", "1e2"], "'1e2' is not an integer"),
        (["--size", str(2 << 20)], "above weir_load's 1 MiB"),
        (["--middle-cpu", "0"], "--middle-cpu 0 is --harness-cpu: share it only in a list"),
        (["--middle-cpu", "7"], "--middle-cpu 7 is not a CPU this process may use [0, 1]"),
        (["--middle-cpu", "1,1"], "a CPU is given twice"),
        (["--middle-cpu", "1;0"], "'1;0' is not a CPU or a list of them"),
        (["--workers", "0"], "0 must be at least 1"),
        (["--json", "/nonexistent-dir/out.json"], "no directory /nonexistent-dir"),
        (["--phases", "rr,tls"], "tls: not a phase (they are bulk, rr, rate, crr)"),
        (["--phases", "rr,rr"], "a phase is given twice"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv, CPUS)
    assert message in capsys.readouterr().err


def test_workers_may_spread_over_every_cpu() -> None:
    args = parse_args(["--workers", "2", "--middle-cpu", "0,1"], CPUS)
    assert (args.workers, args.middle_cpu) == (2, (0, 1))


def test_no_extra_pods() -> None:
    assert parse_args(["--pods", "0"], CPUS).pods == 0


def test_py_spy_directory_is_created(tmp_path: Path) -> None:
    wanted = tmp_path / "profiles" / "run-1"
    args = parse_args(["--py-spy", str(wanted)], CPUS)
    assert args.py_spy == wanted
    assert wanted.is_dir()


def test_py_spy_directory_that_cannot_be_made_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--py-spy", str(blocker / "sub")], CPUS)
    assert f"cannot create {blocker / 'sub'}: Not a directory" in capsys.readouterr().err


# -- what runs ----------------------------------------------------------------------------


def test_every_path_takes_every_position_over_three_repeats() -> None:
    orders = [rotated(i) for i in range(4)]
    assert orders == [
        ("direct", "weir", "envoy"),
        ("weir", "envoy", "direct"),
        ("envoy", "direct", "weir"),
        ("direct", "weir", "envoy"),
    ]


def test_phases_in_order() -> None:
    assert [p.name for p in phases([1000, 5000])] == ["bulk", "rr", "rate1000", "rate5000", "crr"]


def test_some_phases_only() -> None:
    args = parse_args(["--phases", "crr,rate"], CPUS)
    assert [p.name for p in phases([1000], args.phases)] == ["rate1000", "crr"]
    assert parse_args([], CPUS).phases == ["bulk", "rr", "rate", "crr"]


def test_load_command_lines() -> None:
    args = parse_args(["--seconds", "3", "--crr-conns", "8", "--bulk-mib", "64"], CPUS)
    binary = Path("/bin/weir_load")
    target = ("--host", "10.0.0.2", "--port", "8080")
    assert load_argv(binary, Phase("bulk", "bulk"), "10.0.0.2", 8080, args) == [
        "/bin/weir_load",
        "bulk",
        *target,
        "--mib",
        "64",
        "--deadline",
        str(bulk_deadline(64)),
    ]
    common = ("--seconds", "3.0", "--size", "1024")
    assert load_argv(binary, Phase("rate5000", "rate", 5000), "10.0.0.2", 8080, args) == [
        "/bin/weir_load",
        "rate",
        *target,
        *common,
        "--conns",
        "32",
        "--rate",
        "5000",
        "--deadline",
        "23.0",
    ]
    crr = load_argv(binary, Phase("crr", "crr"), "10.0.0.2", 8080, args)
    assert crr[crr.index("--conns") + 1] == "8"


def test_bulk_deadline_allows_a_slow_path() -> None:
    # 512 MiB at 50 Mbit/s is about 86 s; plus the fixed margin.
    assert bulk_deadline(512) == pytest.approx(30 + 512 * 8 * 1.048576 / 0.05 / 1000)


# -- reports and figures -------------------------------------------------------------------

RR_REPORT = {
    "mode": "rr",
    "per_s": 20000.0,
    "p50_us": 100.0,
    "p90_us": 150.0,
    "p99_us": 300.0,
    "max_us": 900.0,
    "ops": 100000,
    "failures": 0,
}


def test_report_is_read() -> None:
    figures = parse_report(json.dumps(RR_REPORT), "rr")
    assert figures == {
        "per_s": 20000.0,
        "p50_us": 100.0,
        "p90_us": 150.0,
        "p99_us": 300.0,
        "max_us": 900.0,
        "ops": 100000.0,
        "failures": 0.0,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "printed no JSON report"),
        ('{"mode": "crr"}', "a report for another mode"),
        ("[1]", "a report for another mode"),
        (json.dumps({**RR_REPORT, "p99_us": None}), "no number 'p99_us'"),
        (json.dumps({**RR_REPORT, "ops": True}), "no number 'ops'"),
        (json.dumps(RR_REPORT).replace("900.0", "NaN"), "no number 'max_us'"),
    ],
)
def test_malformed_reports_are_refused(text: str, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        parse_report(text, "rr")


def test_bulk_figures_with_the_middles_cpu() -> None:
    report = {"gbps": 2.5, "failures": 0.0, "bytes_sent": float(256 << 20)}
    figures = phase_figures(Phase("bulk", "bulk"), report, cpu=1.28)
    assert figures == {"bulk_gbps": 2.5, "bulk_failures": 0.0, "bulk_cpu_ms_per_mib": 5.0}


def test_direct_path_has_no_cpu_figure() -> None:
    report = parse_report(json.dumps(RR_REPORT), "rr")
    figures = phase_figures(Phase("rr", "rr"), report, cpu=None)
    assert figures == {
        "rr_per_s": 20000.0,
        "rr_p50_us": 100.0,
        "rr_p90_us": 150.0,
        "rr_p99_us": 300.0,
        "rr_max_us": 900.0,
        "rr_failures": 0.0,
    }


def test_cpu_per_request_and_per_connection() -> None:
    report = {
        "per_s": 1000.0,
        "p50_us": 50.0,
        "p99_us": 80.0,
        "max_us": 90.0,
        "ops": 4000.0,
        "failures": 1.0,
    }
    rate = phase_figures(Phase("rate1000", "rate", 1000), {**report, "answered": 5000.0}, cpu=0.2)
    assert rate["rate1000_cpu_us_per_op"] == pytest.approx(40.0), "late answers cost CPU too"
    assert "rate1000_p90_us" not in rate
    crr = phase_figures(Phase("crr", "crr"), report, cpu=0.4)
    assert crr["crr_cpu_us_per_op"] == pytest.approx(100.0)
    assert crr["crr_failures"] == 1.0


def test_no_answers_no_cpu_per_op() -> None:
    report = {"per_s": 0.0, "p50_us": 0.0, "p99_us": 0.0, "ops": 0.0, "failures": 32.0}
    assert "crr_cpu_us_per_op" not in phase_figures(Phase("crr", "crr"), report, cpu=0.1)


def test_added_p99_is_against_direct_in_the_same_repeat() -> None:
    run = {
        "direct": {"rate1000_p99_us": 200.0, "rate5000_p99_us": 400.0},
        "weir": {"rate1000_p99_us": 900.0, "rate5000_p99_us": 1400.0},
        "envoy": {"rate1000_p99_us": 500.0},
    }
    add_added_p99(run, [1000, 5000])
    assert run["weir"]["rate1000_added_p99_us"] == 700.0
    assert run["weir"]["rate5000_added_p99_us"] == 1000.0
    assert run["envoy"]["rate1000_added_p99_us"] == 300.0
    assert "rate5000_added_p99_us" not in run["envoy"]
    assert "rate1000_added_p99_us" not in run["direct"]


def test_failures_are_totalled_per_path() -> None:
    run = {"weir": {"bulk_failures": 0.0, "crr_failures": 3.0, "crr_per_s": 10.0}}
    add_failure_totals(run)
    assert run["weir"]["failures"] == 3.0


# -- summaries ------------------------------------------------------------------------------


def test_summary_is_median_and_range() -> None:
    assert summarize([3.0, 1.0, 2.0]) == Summary(2.0, 1.0, 3.0)
    assert summarize([4.0, 1.0, 2.0, 3.0]) == Summary(2.5, 1.0, 4.0)
    assert summarize([7.0]) == Summary(7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_runs_are_summarized_per_path_and_figure() -> None:
    runs = [
        {"weir": {"rr_per_s": 10.0}, "envoy": {"rr_per_s": 20.0}},
        {"weir": {"rr_per_s": 30.0, "crr_per_s": 5.0}, "envoy": {"rr_per_s": 40.0}},
        {"weir": {"rr_per_s": 20.0}, "envoy": {"rr_per_s": 30.0}},
    ]
    summary = summarize_runs(runs)
    assert summary["weir"]["rr_per_s"] == Summary(20.0, 10.0, 30.0)
    assert summary["weir"]["crr_per_s"] == Summary(5.0, 5.0, 5.0)
    assert summary["envoy"]["rr_per_s"] == Summary(30.0, 20.0, 40.0)


def test_cpu_busy_between_two_readings() -> None:
    assert busy_percent((100, 1000), (175, 1100)) == 75.0
    assert busy_percent((100, 1000), (100, 1000)) == 0.0


def test_ratio() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(0.0, 2.0) == 0.0
    assert ratio(3.0, 0.0) is None
    assert ratio(-164.0, 47694.0) is None
    assert ratio(3.0, -1.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [(12345.6, "12346"), (250.0, "250"), (42.25, "42.2"), (3.14159, "3.14"), (0.5761, "0.576")],
)
def test_numbers_are_short(value: float, text: str) -> None:
    assert number(value) == text


def test_table_golden() -> None:
    summary = {
        "direct": {"rr_per_s": Summary(30000.0, 28000.0, 31000.0), "failures": Summary(0, 0, 0)},
        "weir": {
            "rr_per_s": Summary(5000.0, 4000.0, 6000.0),
            "rr_p99_us": Summary(900.0, 800.0, 1000.0),
            "failures": Summary(1, 0, 2),
        },
        "envoy": {
            "rr_per_s": Summary(10000.0, 10000.0, 10000.0),
            "rr_p99_us": Summary(450.0, 450.0, 450.0),
            "failures": Summary(0, 0, 0),
        },
    }
    rows = [
        Row("rr req/s", "rr_per_s", "higher"),
        Row("rr p99 us", "rr_p99_us", "lower"),
        Row("crr conn/s", "crr_per_s", "higher"),  # measured on no path: left out
        Row("failures", "failures", ""),
    ]
    assert render_table(summary, rows).splitlines() == [
        "measure                                    direct               weir  envoy"
        "  weir/direct  weir/envoy",
        "rr req/s                     30000 (28000..31000)  5000 (4000..6000)  10000"
        "         0.17        0.50",
        "rr p99 us (lower is better)                     -    900 (800..1000)    450"
        "            -        2.00",
        "failures                                        0           1 (0..2)      0"
        "            -           -",
    ]


def test_headroom_flags_a_direct_path_that_is_not_far_above() -> None:
    summary = {
        "direct": {"bulk_gbps": Summary(3.0, 3.0, 3.0), "rr_per_s": Summary(30000, 30000, 30000)},
        "weir": {"bulk_gbps": Summary(2.0, 2.0, 2.0), "rr_per_s": Summary(5000, 5000, 5000)},
        "envoy": {"bulk_gbps": Summary(1.0, 1.0, 1.0), "rr_per_s": Summary(10000, 10000, 10000)},
    }
    assert headroom(summary) == [
        "bulk: direct 3 is 1.5x the better proxied path"
        "  WARNING: the harness may be the bottleneck",
        "rr: direct 30000 is 3.0x the better proxied path",
    ]


def busy(harness: float, middle: float, phase: str = "rr") -> dict[str, Summary]:
    return {
        f"{phase}_harness_cpu_pct": Summary(harness, harness, harness),
        f"{phase}_middle_cpu_pct": Summary(middle, middle, middle),
    }


def test_headroom_close_to_direct_is_fine_while_the_middle_is_the_busy_one() -> None:
    summary = {
        "direct": {"rr_per_s": Summary(29585, 29585, 29585)},
        "weir": {"rr_per_s": Summary(7208, 7208, 7208), **busy(80.6, 89.7)},
        "envoy": {"rr_per_s": Summary(21024, 21024, 21024), **busy(56.3, 96.5)},
    }
    assert headroom(summary) == [
        "rr: direct 29585 is 1.4x the better proxied path;"
        " CPU busy harness/middle: weir 81%/90%, envoy 56%/96%"
    ]


def test_headroom_flags_a_saturated_harness() -> None:
    summary = {
        "direct": {"crr_per_s": Summary(5000, 5000, 5000)},
        "weir": {"crr_per_s": Summary(1000, 1000, 1000), **busy(60, 100, "crr")},
        "envoy": {"crr_per_s": Summary(4000, 4000, 4000), **busy(97, 70, "crr")},
    }
    assert headroom(summary) == [
        "crr: direct 5000 is 1.2x the better proxied path;"
        " CPU busy harness/middle: weir 60%/100%, envoy 97%/70%"
        "  WARNING: the harness may be the bottleneck"
    ]


def test_json_document_holds_raw_figures_medians_and_machine() -> None:
    args = parse_args(["--quick"], CPUS)
    result = Result(
        runs=[{"direct": {"rr_per_s": 100.0}, "weir": {"rr_per_s": 40.0}}],
        orders=[("direct", "weir", "envoy")],
        rss_kib={"weir proxy node-1 (1 pod)": 70000.0},
        timings_s={"pods_wired_s": 4.0, "pods_enrolled_s": 0.5},
    )
    doc = json.loads(json.dumps(document(args, ["bench/proxy_hbone.py", "--quick"], result)))
    assert doc["command"] == ["bench/proxy_hbone.py", "--quick"]
    assert doc["repeats"] == [
        {
            "order": ["direct", "weir", "envoy"],
            "figures": {"direct": {"rr_per_s": 100.0}, "weir": {"rr_per_s": 40.0}},
        }
    ]
    assert doc["summary"]["weir"]["rr_per_s"] == {"median": 40.0, "low": 40.0, "high": 40.0}
    assert math.isclose(doc["ratios"]["weir/direct"]["rr_per_s"], 0.4)
    assert doc["ratios"]["weir/envoy"]["rr_per_s"] is None
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["kernel"]
    assert doc["settings"]["repeats"] == 1
    assert doc["rss_kib"] == {"weir proxy node-1 (1 pod)": 70000.0}


def test_workloads_cross_to_the_proxy_child_intact() -> None:
    workload = Workload(
        "uid-1", "a", "default", "sa-a", "node-1", ("10.244.1.2",), captured=True,
        mtls_mode=MtlsMode.PERMISSIVE,
    )  # fmt: skip
    assert workload_from_json(json.loads(json.dumps(workload_json(workload)))) == workload
