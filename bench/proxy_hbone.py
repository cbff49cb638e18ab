"""HBONE proxy benchmark: Weir beside Envoy and a direct path (run by hand as root, not a test).

    .venv/bin/python bench/proxy_hbone.py [--repeats 5] [--seconds 5] [--json out.json]
    .venv/bin/python bench/proxy_hbone.py --quick            (a smoke run: 1 repeat, 2 s phases)
    .venv/bin/python bench/proxy_hbone.py --phases rr,crr    (only those; bulk, rr, rate, crr)

Three paths between two simulated nodes (LocalTopology, real CNI wiring):

- direct: pod c (node 1) -> pod d (node 2), no proxy;
- weir:   pod a (node 1, captured) -> 15001 of proxy 1 -> HBONE (mTLS, pooled) ->
          15008 of proxy 2 -> pod b (node 2, captured); each proxy its own process;
- envoy:  pod e (captured) -> 15001 of Envoy in e (original_dst listener filter,
          tcp_proxy + tunneling_config naming the original destination) -> HBONE ->
          Envoy in f (CONNECT termination) -> pod f; each Envoy with --concurrency 1
          (see --workers).

Both do the same job per connection, an access log included: each Weir proxy
and each Envoy writes one JSON line per connection (stream) to /dev/null,
Weir through its own writer thread, Envoy through its file access log.

a, b, e and f carry the same capture rules (iptables, nft), so both proxied
paths pay for netfilter alike: the load generator dials the echo server's
address from a or e, capture redirects that to the pod's 15001 (nat REDIRECT),
and the proxy there asks where it was going (SO_ORIGINAL_DST) and puts that in
the CONNECT; a proxy's upstream connect goes through its pod's nat table and
conntrack in the proxy's own process. The Envoys run as the proxy's UID
(1337), which capture lets by, as Weir's proxies are let by through their
mark. The direct path (c -> d) has no capture.

The ends are C programs (bench/native: weir_load, weir_echo), the same on
every path, so only what sits in between differs. The two processes in the
middle (both proxies, or both Envoys) are pinned to one CPU (--middle-cpu,
default 1), the load generator and the echo servers to another (--harness-cpu,
default 0).

--workers N runs each Weir node proxy as N processes sharing its listeners
(what `weir proxy run --workers N` forks: whole proxies, each its own
bench/proxy_hbone_child.py here) and each Envoy with --concurrency N; give
--middle-cpu a list (1,2 or 0,1) for them to spread over. Where it includes
the harness's CPU, both share it and the figures say what the machine does,
not what the middle does alone. Each repeat runs every path once, in an order rotated by one each
repeat (direct, weir, envoy; then weir, envoy, direct; ...), so a slow spell of
a shared machine falls on every path alike. The table shows the median over
repeats and the range (min..max).

Figures (per path, per repeat):

- bulk Gbit/s: one connection writes --bulk-mib MiB while reading the echo
  back; payload bits one way per second, connect to the echo's EOF.
- rr req/s and p50/p90/p99 (us): --conns connections in closed loop at
  saturation, --size-byte requests; latency from write to the echo's last byte.
- rate R: an open loop at R requests/s in total over --conns connections;
  latency counts from when a request was due, so a stall is charged to every
  request it delayed (no coordinated omission). "achieved" is answers per
  second within the phase (short of R if the path cannot keep up; past its
  capacity, requests queue and the proxy reads several per segment, so CPU
  per request drops while latency soars); "added p99" is the path's p99
  minus the direct path's p99 in the same repeat: what the middle adds to
  the tail at that load.
- crr conn/s: --crr-conns slots each connecting, sending --size bytes, reading
  the echo and closing, over and over; p99 of that whole exchange.
- CPU per MiB / request / connection: user+system time of the two middle
  processes (/proc/<pid>/stat) over that phase alone, divided by the phase's
  MiB, answered requests or connections. It stays comparable when other work
  shares the machine, where rates do not.
- CPU busy %: how busy the harness's CPU and the middle's CPU were over
  the phase (/proc/stat). On a quiet machine a saturating phase shows the
  middle's near 100 and the harness's below it; other work on the machine
  counts too, so on a shared one both read 100 and say little.
- failures: connects refused or timed out, resets, unanswered requests; a
  sane run has none.
- py-spy (--py-spy DIR): each Weir proxy sampled (--native, raw format, one
  file per proxy and repeat) during its path's phases. py-spy pauses the
  process to sample, so a profiled run's Weir figures are lower: profile
  and measure in separate runs.
- RSS (after all repeats): VmRSS of each Weir proxy with the benchmark's pods,
  then with --pods more captured pods enrolled on node 1's proxy (each its own
  service account, so its own certificate); Envoy's for reference. Each Weir
  proxy runs in bench/proxy_hbone_child.py, which loads what `weir proxy run`
  loads (protobuf and its control-plane client included) and not the
  benchmark's own libraries;
  certificates are issued here and handed to it, as the CA answers a node.

The harness must not be the bottleneck: the direct path's figures are
printed beside the others, and the harness check after the table warns
when, on bulk, rr or crr, the direct path is not twice the better proxied
path while the harness's CPU was saturated on a proxied one.

The CPU figures are the middle processes' own (system calls included); the
kernel's receive work for a packet runs on the sending CPU (veth delivers in
the sender's context), so part of the network stack's work for either middle
lands on the harness's CPU, alike for Weir and Envoy.

All pods get net.ipv4.tcp_tw_reuse=1, ports 20000-65000 for outgoing
connections and at most 4096 TIME_WAIT sockets (tcp_max_tw_buckets): crr
leaves TIME_WAIT sockets at the client and at each middle's upstream side
(it sends the first FIN towards the app), and with tens of thousands of them
every connect() searches the port range: perf showed that search
(__inet_hash_connect, __inet_check_established) as 40-55% of whichever
middle ran its crr phase while many were pending, Weir or Envoy alike, so
the figure depended on the order of the paths, not on the proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import selectors
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal

from bench.proxy_hbone_child import READY, certificate_json, workload_json
from controlplane.ca import load_or_create_root
from node_agent.constants import OUTBOUND_CAPTURE_PORT, PROXY_GID, PROXY_UID
from node_agent.localmesh.topology import LocalTopology, Node, Pod
from node_agent.localmesh.wiring import set_sysctls
from node_agent.netns import Netns, entered
from node_agent.proxy.model import Workload
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.iptables import IptablesCapture
from testbed import native
from testbed.proxy_fakes import LocalCaCertificates
from testbed.proxy_lab import (
    TRUST_DOMAIN,
    EnvoyProcess,
    envoy_hbone_client,
    envoy_hbone_server,
    write_svid,
)
from weir_common import openssl_runtime
from weir_common.mesh import SpiffeId

PATHS: Final = ("direct", "weir", "envoy")
ECHO_PORT: Final = 8080
CHILD: Final = Path(__file__).with_name("proxy_hbone_child.py")
CHILD_READY_TIMEOUT: Final = 60.0
ENROLL_TIMEOUT: Final = 600.0
POD_SYSCTLS: Final = {
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.ip_local_port_range": "20000 65000",
    "net.ipv4.tcp_max_tw_buckets": "4096",
}
# weir_load's exit statuses: 0 clean, 2 some failures (report still printed).
LOAD_OK: Final = (0, 2)
QUICK: Final = {"repeats": 1, "seconds": 2.0, "bulk_mib": 128}
DEFAULTS: Final = {"repeats": 5, "seconds": 5.0, "bulk_mib": 512}


class BenchError(Exception):
    """The benchmark cannot go on (a child failed, a report is malformed)."""


# -- pure parts: what to run, and what the numbers say --------------------------


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str  # prefix of the figures' names: bulk, rr, rate1000, crr
    mode: Literal["bulk", "rr", "rate", "crr"]
    rate: int = 0


@dataclasses.dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    key: str
    better: Literal["higher", "lower", ""]  # "" for counts that should be 0


PHASE_KINDS: Final = ("bulk", "rr", "rate", "crr")


def phases(rates: Sequence[int], kinds: Sequence[str] = PHASE_KINDS) -> tuple[Phase, ...]:
    """The phases each path runs, in this order; `kinds` picks some (--phases)."""
    every = (
        Phase("bulk", "bulk"),
        Phase("rr", "rr"),
        *(Phase(f"rate{r}", "rate", r) for r in rates),
        Phase("crr", "crr"),
    )
    return tuple(p for p in every if p.mode in kinds)


def rotated(repeat: int, paths: Sequence[str] = PATHS) -> tuple[str, ...]:
    """The order of the paths in repeat `repeat` (0-based): shifted by one each repeat."""
    shift = repeat % len(paths)
    return (*paths[shift:], *paths[:shift])


def load_argv(
    binary: Path, phase: Phase, host: str, port: int, args: argparse.Namespace
) -> list[str]:
    """weir_load's command line for one phase; its hard deadline leaves room for slow paths."""
    argv = [str(binary), phase.mode, "--host", host, "--port", str(port)]
    if phase.mode == "bulk":
        return [*argv, "--mib", str(args.bulk_mib), "--deadline", str(bulk_deadline(args.bulk_mib))]
    conns = args.crr_conns if phase.mode == "crr" else args.conns
    argv += ["--seconds", str(args.seconds), "--size", str(args.size), "--conns", str(conns)]
    if phase.mode == "rate":
        argv += ["--rate", str(phase.rate)]
    return [*argv, "--deadline", str(args.seconds + 20)]


def bulk_deadline(mib: int) -> float:
    """Long enough at 50 Mbit/s, far below any path worth measuring."""
    return 30.0 + mib * 8 * 1.048576 / 0.05 / 1000


REPORT_KEYS: Final = {
    "bulk": ("gbps", "ops", "failures", "bytes_sent", "bytes_received"),
    "rr": ("per_s", "p50_us", "p90_us", "p99_us", "max_us", "ops", "failures"),
    "rate": ("per_s", "p50_us", "p99_us", "max_us", "ops", "answered", "failures", "target_rate"),
    "crr": ("per_s", "p50_us", "p99_us", "ops", "failures"),
}


def parse_report(text: str, mode: str) -> dict[str, float]:
    """weir_load's JSON line, checked: the mode asked for and every figure used here."""
    try:
        report = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"weir_load {mode} printed no JSON report ({e}): {text[:200]!r}") from None
    if not isinstance(report, dict) or report.get("mode") != mode:
        raise BenchError(f"weir_load {mode} printed a report for another mode: {text[:200]!r}")
    figures: dict[str, float] = {}
    for key in REPORT_KEYS[mode]:
        value = report.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise BenchError(f"weir_load {mode} report has no number {key!r}: {text[:200]!r}")
        figures[key] = float(value)
    return figures


def phase_figures(phase: Phase, report: Mapping[str, float], cpu: float | None) -> dict[str, float]:
    """One phase's figures, named `<phase>_<figure>`; `cpu` is the middle's CPU seconds
    over the phase (None on the direct path, which has no middle)."""
    p = phase.name
    if phase.mode == "bulk":
        out = {f"{p}_gbps": report["gbps"], f"{p}_failures": report["failures"]}
        mib = report["bytes_sent"] / (1 << 20)
        if cpu is not None and mib > 0:
            out[f"{p}_cpu_ms_per_mib"] = cpu * 1e3 / mib
        return out
    out = {
        f"{p}_per_s": report["per_s"],
        f"{p}_p50_us": report["p50_us"],
        f"{p}_p99_us": report["p99_us"],
        f"{p}_failures": report["failures"],
    }
    if phase.mode == "rr":
        out[f"{p}_p90_us"] = report["p90_us"]
    if phase.mode in ("rr", "rate"):
        out[f"{p}_max_us"] = report["max_us"]
    # The middle's CPU over the phase includes the late answers of an open loop.
    ops = report["answered"] if phase.mode == "rate" else report["ops"]
    if cpu is not None and ops > 0:
        out[f"{p}_cpu_us_per_op"] = cpu * 1e6 / ops
    return out


def add_added_p99(run: dict[str, dict[str, float]], rates: Sequence[int]) -> None:
    """`rate<R>_added_p99_us` for each proxied path: its p99 minus direct's, same repeat."""
    direct = run.get("direct", {})
    for path, figures in run.items():
        if path == "direct":
            continue
        for r in rates:
            key = f"rate{r}_p99_us"
            if key in figures and key in direct:
                figures[f"rate{r}_added_p99_us"] = figures[key] - direct[key]


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    return Summary(statistics.median(values), min(values), max(values))


def summarize_runs(
    runs: Sequence[Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, Summary]]:
    """Per path and figure, over every repeat that has it."""
    collected: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for path, figures in run.items():
            for key, value in figures.items():
                collected.setdefault(path, {}).setdefault(key, []).append(value)
    return {
        path: {key: summarize(values) for key, values in figures.items()}
        for path, figures in collected.items()
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """None unless both are known and the quotient means something: an added
    p99 can come out negative in a noisy repeat, and x / -y says nothing."""
    if numerator is None or denominator is None or numerator < 0 or denominator <= 0:
        return None
    return numerator / denominator


def table_rows(rates: Sequence[int], conns: int, crr_conns: int, size: int) -> list[Row]:
    rows = [
        Row("bulk Gbit/s (1 conn, one way)", "bulk_gbps", "higher"),
        Row(f"rr req/s ({conns} conns, {size} B)", "rr_per_s", "higher"),
        Row("rr p50 us", "rr_p50_us", "lower"),
        Row("rr p90 us", "rr_p90_us", "lower"),
        Row("rr p99 us", "rr_p99_us", "lower"),
        Row("rr max us", "rr_max_us", "lower"),
    ]
    for r in rates:
        rows += [
            Row(f"rate {r}/s achieved", f"rate{r}_per_s", "higher"),
            Row(f"rate {r}/s p50 us", f"rate{r}_p50_us", "lower"),
            Row(f"rate {r}/s p99 us", f"rate{r}_p99_us", "lower"),
            Row(f"rate {r}/s added p99 us", f"rate{r}_added_p99_us", "lower"),
        ]
    rows += [
        Row(f"crr conn/s ({crr_conns} in flight)", "crr_per_s", "higher"),
        Row("crr p99 us", "crr_p99_us", "lower"),
        Row("middle CPU ms / MiB (bulk)", "bulk_cpu_ms_per_mib", "lower"),
        Row("middle CPU us / request (rr)", "rr_cpu_us_per_op", "lower"),
        *(Row(f"middle CPU us / req (rate {r})", f"rate{r}_cpu_us_per_op", "lower") for r in rates),
        Row("middle CPU us / new conn (crr)", "crr_cpu_us_per_op", "lower"),
        *(
            Row(f"{who} CPU busy % ({phase})", f"{phase}_{who}_cpu_pct", "")
            for phase in ("bulk", "rr", "crr")
            for who in ("harness", "middle")
        ),
        Row("failures (all phases)", "failures", ""),
    ]
    return rows


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How busy a CPU was between two (busy, total) tick readings, in percent."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else 0.0


def add_failure_totals(run: dict[str, dict[str, float]]) -> None:
    for figures in run.values():
        figures["failures"] = sum(v for k, v in figures.items() if k.endswith("_failures"))


def number(value: float) -> str:
    """Three significant digits or so, without exponent notation."""
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 1 else f"{value:.3f}"


def cell(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    if summary.low == summary.high:
        return number(summary.median)
    return f"{number(summary.median)} ({number(summary.low)}..{number(summary.high)})"


def median_of(summary: Mapping[str, Mapping[str, Summary]], path: str, key: str) -> float | None:
    found = summary.get(path, {}).get(key)
    return None if found is None else found.median


def render_table(summary: Mapping[str, Mapping[str, Summary]], rows: Sequence[Row]) -> str:
    """Medians (min..max) per path, then weir/direct and weir/envoy of the medians."""
    header = ["measure", *PATHS, "weir/direct", "weir/envoy"]
    lines = [header]
    for row in rows:
        cells = [cell(summary.get(path, {}).get(row.key)) for path in PATHS]
        if all(c == "-" for c in cells):
            continue
        weir = median_of(summary, "weir", row.key)
        ratios = [ratio(weir, median_of(summary, other, row.key)) for other in ("direct", "envoy")]
        if row.better == "":
            ratios = [None, None]
        label = row.label + (" (lower is better)" if row.better == "lower" else "")
        lines.append([label, *cells, *("-" if r is None else f"{r:.2f}" for r in ratios)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


HEADROOM_KEYS: Final = (("bulk_gbps", "bulk"), ("rr_per_s", "rr"), ("crr_per_s", "crr"))
HARNESS_SATURATED_PCT: Final = 90.0


def headroom(summary: Mapping[str, Mapping[str, Summary]]) -> list[str]:
    """Per saturating phase: how far the direct path is above the better proxied path, and
    how busy the harness's and the middle's CPUs were on each proxied path.

    Flagged when the direct path is not twice as high AND the harness's CPU was
    saturated on a proxied path: then the harness, not the middle, may be the limit.
    (Direct alone is no proof either way: it pays the kernel's forwarding on the
    harness's CPU for both directions, where a proxied path shares it with the middle's.)
    """
    lines = []
    for key, name in HEADROOM_KEYS:
        direct = median_of(summary, "direct", key)
        proxied = [v for p in ("weir", "envoy") if (v := median_of(summary, p, key)) is not None]
        if direct is None or not proxied:
            continue
        factor = ratio(direct, max(proxied))
        text = "inf" if factor is None else f"{factor:.1f}x"
        busy = []
        saturated = False
        for path in ("weir", "envoy"):
            harness = median_of(summary, path, f"{name}_harness_cpu_pct")
            middle = median_of(summary, path, f"{name}_middle_cpu_pct")
            if harness is not None and middle is not None:
                busy.append(f"{path} {harness:.0f}%/{middle:.0f}%")
                saturated |= harness >= HARNESS_SATURATED_PCT
        line = f"{name}: direct {number(direct)} is {text} the better proxied path"
        if busy:
            line += "; CPU busy harness/middle: " + ", ".join(busy)
        if factor is not None and factor < 2 and (saturated or not busy):
            line += "  WARNING: the harness may be the bottleneck"
        lines.append(line)
    return lines


def render_rss(rss: Mapping[str, float]) -> str:
    return "\n".join(f"{name:40} {kib / 1024:8.1f} MiB" for name, kib in rss.items())


def check_cpus(harness: int, middle: tuple[int, ...], available: set[int]) -> None:
    if middle == (harness,):
        raise ValueError(
            f"--middle-cpu {harness} is --harness-cpu: share it only in a list of CPUs "
            "the middle spreads over (0,1)"
        )
    for flag, cpu in (("--harness-cpu", harness), *(("--middle-cpu", c) for c in middle)):
        if cpu not in available:
            raise ValueError(f"{flag} {cpu} is not a CPU this process may use {sorted(available)}")


# -- the harness: processes, pinning, measuring ---------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The child's next stdout line, or BenchError if it exits or stays silent."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise BenchError(f"{what} said nothing for {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise BenchError(f"{what} exited (status {proc.wait(timeout=5)}) before answering")
    return line.strip()


def spawn(netns: Netns | None, argv: Sequence[str], what: str) -> subprocess.Popen[str]:
    """A child (inside `netns` if given), returned once it printed "ready"."""
    with entered(netns) if netns is not None else contextlib.nullcontext():
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = read_line(proc, CHILD_READY_TIMEOUT, what)
    except BaseException:
        proc.kill()
        proc.wait(timeout=5)
        raise
    if line != READY:
        proc.kill()
        proc.wait(timeout=5)
        raise BenchError(f"{what} failed to start (said {line!r})")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def pin(pid: int, cpus: tuple[int, ...]) -> None:
    """Every thread of `pid` onto `cpus` (sched_setaffinity on a pid moves only its main
    thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), set(cpus))


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time the processes (all their threads) have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def vm_rss_kib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    raise BenchError(f"process {pid} has no VmRSS (a kernel thread, or gone)")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a path's load starts and what it connects to; `middle`: the processes between."""

    netns: Netns
    host: str
    port: int
    middle: tuple[int, ...]


def run_load(netns: Netns, argv: Sequence[str], what: str) -> str:
    with entered(netns):
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=_deadline_of(argv) + 15, check=False
        )
    if proc.returncode not in LOAD_OK:
        raise BenchError(
            f"{what}: weir_load exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
        )
    return proc.stdout


def _deadline_of(argv: Sequence[str]) -> float:
    return float(argv[argv.index("--deadline") + 1])


def measure(binary: Path, path: str, target: Target, args: argparse.Namespace) -> dict[str, float]:
    """Every phase on one path, after a short unrecorded warm-up (pools, handshakes)."""
    warm = [str(binary), "rr", "--host", target.host, "--port", str(target.port)]
    run_load(
        target.netns,
        [*warm, "--seconds", "0.3", "--conns", "4", "--deadline", "20"],
        f"{path} warm-up",
    )
    figures: dict[str, float] = {}
    cpus = {"harness": (args.harness_cpu,), "middle": args.middle_cpu}
    for phase in phases(args.rates, args.phases):
        argv = load_argv(binary, phase, target.host, target.port, args)
        before, ticks_before = cpu_seconds(target.middle), cpu_ticks()
        out = run_load(target.netns, argv, f"{path} {phase.name}")
        spent, ticks_after = cpu_seconds(target.middle) - before, cpu_ticks()
        report = parse_report(out, phase.mode)
        figures.update(phase_figures(phase, report, spent if target.middle else None))
        for who, group in cpus.items():
            busy = [busy_percent(ticks_before[cpu], ticks_after[cpu]) for cpu in group]
            figures[f"{phase.name}_{who}_cpu_pct"] = sum(busy) / len(busy)
    return figures


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU, (busy, total) ticks so far from /proc/stat; busy is all but idle and iowait.

    Whole-CPU figures, whoever ran there: they show whether the harness's CPU
    or the middle's was the one saturated during a phase.
    """
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            values = [int(v) for v in fields[:8]]
            ticks[int(name[3:])] = (sum(values) - values[3] - values[4], sum(values))
    return ticks


@contextlib.contextmanager
def py_spy(directory: Path | None, pids: Mapping[str, int], tag: str) -> Iterator[None]:
    """Samples each named pid with py-spy while the block runs (nothing if no directory)."""
    if directory is None:
        yield
        return
    binary = Path(sys.executable).parent / "py-spy"
    recorders = []
    for name, pid in pids.items():
        output = directory / f"{name}-{tag}.txt"
        argv = [
            str(binary),
            "record",
            "--native",
            "--format",
            "raw",
            "-o",
            str(output),
            "--pid",
            str(pid),
        ]
        recorders.append(
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for recorder in recorders:
            try:
                _, err = recorder.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                _, err = recorder.communicate(timeout=5)
            if recorder.returncode not in (0, -signal.SIGINT):
                print(f"py-spy exited {recorder.returncode}: {err.strip()[-300:]}", file=sys.stderr)


def make_workload(pod: Pod, captured: bool) -> Workload:
    return Workload(
        pod.uid,
        pod.name,
        pod.namespace,
        pod.name,
        pod.node.name,
        (str(pod.ipv4),),
        captured=captured,
    )


def certificates_for(
    issuer: LocalCaCertificates, workloads: Sequence[Workload]
) -> dict[str, dict[str, object]]:
    """Each workload's certificate, issued here as the CA answers a node's CSR."""
    identities = {SpiffeId(TRUST_DOMAIN, w.namespace, w.service_account) for w in workloads}
    return {str(i): certificate_json(issuer.issue(i)) for i in sorted(identities, key=str)}


def worker_name(node: str, index: int) -> str:
    """The first worker is named by its node alone, as a proxy of one process is."""
    return node if index == 0 else f"{node} worker {index}"


def enroll_many(
    topology: LocalTopology,
    node: Node,
    workers: Sequence[subprocess.Popen[str]],
    issuer: LocalCaCertificates,
    capture: IptablesCapture,
    captured: list[Pod],
    count: int,
) -> dict[str, float]:
    """`count` more captured pods on `node`, enrolled with each worker of its proxy; how long
    each part took."""
    started = time.monotonic()
    pods = []
    for i in range(count):
        pod = topology.add_pod(node, f"rss-{i}")
        pods.append(pod)
        capture.apply(pod.netns, CaptureConfig())
        captured.append(pod)
    wired = time.monotonic()
    workloads = [make_workload(p, True) for p in pods]
    request = {
        "workloads": [workload_json(w) for w in workloads],
        "certificates": certificates_for(issuer, workloads),
        "pods": [{"key": f"{p.namespace}/{p.name}", "netns": str(p.netns.path)} for p in pods],
    }
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(json.dumps(request) + "\n")
        worker.stdin.flush()
    for worker in workers:
        answer = read_line(worker, ENROLL_TIMEOUT, "node-1 proxy enrolling pods")
        if answer != f"added {count}":
            raise BenchError(f"node-1 proxy answered {answer!r} to {count} pods")
    return {"pods_wired_s": wired - started, "pods_enrolled_s": time.monotonic() - wired}


def machine() -> dict[str, object]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": os.uname().release,
        # The Weir proxies are this interpreter's children: they run on the same OpenSSL.
        "weir_openssl": f"{ssl.OPENSSL_VERSION} ({openssl_runtime.owner()})",
    }


def git_head() -> str | None:
    proc = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


@dataclasses.dataclass
class Result:
    """What a run measured: per repeat, per path, per figure; memory; pod setup times."""

    runs: list[dict[str, dict[str, float]]] = dataclasses.field(default_factory=list)
    orders: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    rss_kib: dict[str, float] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)


def run_benchmark(args: argparse.Namespace) -> Result:
    if os.geteuid() != 0:
        raise SystemExit("bench/proxy_hbone.py needs root (network namespaces, iptables)")
    # Everything started from here inherits the harness CPU; the middle is moved off it.
    os.sched_setaffinity(0, {args.harness_cpu})
    load_binary = native.build("weir_load")
    echo_binary = native.build("weir_echo")
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    envoy_dir = Path(tempfile.mkdtemp(prefix="weir-bench-envoy-"))
    children: list[subprocess.Popen[str]] = []
    envoys: list[EnvoyProcess] = []
    captured: list[Pod] = []
    result = Result()
    rss = result.rss_kib
    capture = IptablesCapture(Backend.NFT)
    with LocalTopology() as topology:
        ca = load_or_create_root(work / "ca", TRUST_DOMAIN, now=datetime.datetime.now(datetime.UTC))
        issuer = LocalCaCertificates(ca)
        try:
            n1 = topology.add_node("node-1", "10.244.1.0/24")
            n2 = topology.add_node("node-2", "10.244.2.0/24")
            a, c, e = (topology.add_pod(n1, name) for name in ("a", "c", "e"))
            b, d, f = (topology.add_pod(n2, name) for name in ("b", "d", "f"))
            for pod in (a, b, c, d, e, f):
                set_sysctls(pod.netns, POD_SYSCTLS)
            workloads = [make_workload(p, p in (a, b)) for p in (a, b, c, d)]
            # Both proxied paths pay for capture alike: Weir's pods a and b and
            # Envoy's pods e and f get the same rules (the Envoys run as the
            # proxy's UID, which capture exempts); c and d, the direct path, none.
            for pod in (a, b, e, f):
                capture.apply(pod.netns, CaptureConfig())
                captured.append(pod)
            proxies: dict[str, list[subprocess.Popen[str]]] = {}
            for node, pod in (("node-1", a), ("node-2", b)):
                config = work / f"{node}.json"
                config.write_text(
                    json.dumps(
                        {
                            "trust_domain": TRUST_DOMAIN,
                            "trust_bundle": ca.trust_bundle_pem,
                            "certificates": certificates_for(issuer, [make_workload(pod, True)]),
                            "workloads": [workload_json(w) for w in workloads],
                            "pods": [
                                {"key": f"{pod.namespace}/{pod.name}", "netns": str(pod.netns.path)}
                            ],
                        }
                    )
                )
                proxies[node] = [
                    spawn(None, [sys.executable, str(CHILD), str(config)], f"{node} proxy {i}")
                    for i in range(args.workers)
                ]
                children += proxies[node]
            for pod in (b, d, f):
                argv = [str(echo_binary), "--addr", str(pod.ipv4), "--port", str(ECHO_PORT)]
                children.append(spawn(pod.netns, argv, f"echo server in {pod.name}"))
            bundle = ca.trust_bundle_pem
            d_ip, f_ip = str(d.ipv4), str(f.ipv4)
            os.chown(envoy_dir, PROXY_UID, PROXY_GID)  # the Envoys' UID only

            def envoy_svid(name: str) -> dict[str, str]:
                cert = issuer.issue(SpiffeId(TRUST_DOMAIN, "default", name))
                return write_svid(envoy_dir, name, cert, bundle, owner=PROXY_UID)

            client = EnvoyProcess(
                e.netns,
                envoy_hbone_client(
                    OUTBOUND_CAPTURE_PORT,
                    tunnel_address=f_ip,
                    authority="%DOWNSTREAM_LOCAL_ADDRESS%",
                    original_destination=True,
                    svid=envoy_svid("e"),
                    peer_identity=str(SpiffeId(TRUST_DOMAIN, "default", "f")),
                    access_log_path=os.devnull,
                ),
                envoy_dir,
                "envoy-e",
                uid=PROXY_UID,
                concurrency=args.workers,
            )
            envoys.append(client)
            server = EnvoyProcess(
                f.netns,
                envoy_hbone_server(
                    listen_address=f_ip,
                    app_address=f_ip,
                    app_port=ECHO_PORT,
                    svid=envoy_svid("f"),
                    access_log_path=os.devnull,
                ),
                envoy_dir,
                "envoy-f",
                uid=PROXY_UID,
                concurrency=args.workers,
            )
            envoys.append(server)
            client.wait_listening("127.0.0.1", OUTBOUND_CAPTURE_PORT)
            server.wait_listening(f_ip, 15008)
            weir_pids = {
                worker_name(node, i): proc.pid
                for node, procs in proxies.items()
                for i, proc in enumerate(procs)
            }
            for pid in (*weir_pids.values(), client.pid, server.pid):
                pin(pid, args.middle_cpu)
            targets = {
                "direct": Target(c.netns, d_ip, ECHO_PORT, ()),
                "weir": Target(a.netns, str(b.ipv4), ECHO_PORT, tuple(weir_pids.values())),
                "envoy": Target(e.netns, f_ip, ECHO_PORT, (client.pid, server.pid)),
            }
            for repeat in range(args.repeats):
                order = rotated(repeat)
                result.orders.append(order)
                run: dict[str, dict[str, float]] = {}
                for path in order:
                    print(
                        f"repeat {repeat + 1}/{args.repeats}: {path}", file=sys.stderr, flush=True
                    )
                    spying: contextlib.AbstractContextManager[None] = (
                        py_spy(args.py_spy, weir_pids, f"repeat-{repeat + 1}")
                        if path == "weir"
                        else contextlib.nullcontext()
                    )
                    with spying:
                        run[path] = measure(load_binary, path, targets[path], args)
                add_added_p99(run, args.rates)
                add_failure_totals(run)
                result.runs.append(run)
            for name, pid in weir_pids.items():
                rss[f"weir proxy {name} (1 pod)"] = vm_rss_kib(pid)
            rss["envoy client (e)"] = vm_rss_kib(client.pid)
            rss["envoy server (f)"] = vm_rss_kib(server.pid)
            if args.pods:
                print(f"enrolling {args.pods} pods on node-1", file=sys.stderr, flush=True)
                result.timings_s = enroll_many(
                    topology, n1, proxies["node-1"], issuer, capture, captured, args.pods
                )
                time.sleep(1.0)
                for i in range(args.workers):
                    name = worker_name("node-1", i)
                    rss[f"weir proxy {name} ({args.pods + 1} pods)"] = vm_rss_kib(weir_pids[name])
        finally:
            for envoy in envoys:
                envoy.close()
            for child in children:
                stop(child)
            for pod in captured:
                with contextlib.suppress(Exception):
                    capture.remove(pod.netns)
            # Holds the CA's and the Envoys' private keys: never left behind.
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(envoy_dir, ignore_errors=True)
    return result


def document(args: argparse.Namespace, argv: Sequence[str], result: Result) -> dict[str, object]:
    """The JSON written by --json: raw figures per repeat, the summary, how it was run."""
    summary = summarize_runs(result.runs)
    medians = {
        path: {key: dataclasses.asdict(s) for key, s in figures.items()}
        for path, figures in summary.items()
    }
    ratios: dict[str, dict[str, float | None]] = {"weir/direct": {}, "weir/envoy": {}}
    for key, s in summary.get("weir", {}).items():
        ratios["weir/direct"][key] = ratio(s.median, median_of(summary, "direct", key))
        ratios["weir/envoy"][key] = ratio(s.median, median_of(summary, "envoy", key))
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": list(argv),
        "git": git_head(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "repeats": [
            {"order": list(order), "figures": run}
            for order, run in zip(result.orders, result.runs, strict=True)
        ],
        "summary": medians,
        "ratios": ratios,
        "rss_kib": result.rss_kib,
        "timings_s": result.timings_s,
    }


def report(args: argparse.Namespace, result: Result) -> str:
    summary = summarize_runs(result.runs)
    timings = result.timings_s
    parts = [
        f"{args.repeats} repeat(s), {args.seconds} s phases; median (min..max); "
        f"Weir on {ssl.OPENSSL_VERSION} ({openssl_runtime.owner()})",
        render_table(summary, table_rows(args.rates, args.conns, args.crr_conns, args.size)),
        "",
        "harness check (direct vs the better proxied path):",
        *headroom(summary),
        "",
        "resident memory:",
        render_rss(result.rss_kib),
    ]
    if timings:
        parts.append(
            f"{args.pods} pods: wired and captured in {timings['pods_wired_s']:.1f} s, "
            f"enrolled by the proxy in {timings['pods_enrolled_s']:.1f} s"
        )
    return "\n".join(parts)


# -- options ---------------------------------------------------------------------------


def positive_int(value: str) -> int:
    try:
        number_ = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number_ < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number_


def non_negative_int(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return count


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (0 < seconds <= 600):
        raise argparse.ArgumentTypeError(f"{value} s is not in (0, 600]")
    return seconds


def cpu_list(value: str) -> tuple[int, ...]:
    try:
        cpus = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a CPU or a list of them") from None
    if len(set(cpus)) != len(cpus) or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"{value}: a CPU is given twice, or is negative")
    return cpus


def rate_list(value: str) -> list[int]:
    rates = [positive_int(part) for part in value.split(",")]
    if len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"{value}: a rate is given twice")
    return rates


def phase_list(value: str) -> list[str]:
    kinds = value.split(",")
    unknown = [k for k in kinds if k not in PHASE_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{','.join(unknown)}: not a phase (they are {', '.join(PHASE_KINDS)})"
        )
    if len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"{value}: a phase is given twice")
    return kinds


def output_dir(value: str) -> Path:
    """Created now, so a bad directory fails before minutes of setup."""
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create {path}: {e.strerror}") from None
    return path


def parse_args(argv: Sequence[str], available_cpus: set[int] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--repeats", type=positive_int, help=f"interleaved repeats (default {DEFAULTS['repeats']})"
    )
    parser.add_argument(
        "--seconds",
        type=positive_seconds,
        help=f"per rr, rate and crr phase (default {DEFAULTS['seconds']})",
    )
    parser.add_argument(
        "--bulk-mib", type=positive_int, help=f"bulk phase payload (default {DEFAULTS['bulk_mib']})"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repeat, 2 s phases, 128 MiB bulk"
    )
    parser.add_argument(
        "--conns", type=positive_int, default=32, help="connections for rr and rate"
    )
    parser.add_argument(
        "--crr-conns", type=positive_int, default=32, help="crr exchanges in flight"
    )
    parser.add_argument("--size", type=positive_int, default=1024, help="request bytes")
    parser.add_argument(
        "--rates", type=rate_list, default=[1000, 5000], help="open-loop rates, comma-separated"
    )
    parser.add_argument(
        "--phases",
        type=phase_list,
        default=list(PHASE_KINDS),
        help="which phases run, comma-separated (default all: bulk,rr,rate,crr); "
        "for a change that touches one, more repeats of it in the same time",
    )
    parser.add_argument(
        "--pods", type=non_negative_int, default=100, help="extra pods enrolled on node 1 for RSS"
    )
    parser.add_argument(
        "--harness-cpu", type=int, default=0, help="CPU of the load generator and echo servers"
    )
    parser.add_argument(
        "--middle-cpu",
        type=cpu_list,
        default=(1,),
        help="CPU of the proxies and the Envoys (a list, 1,2, with --workers)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="processes per Weir node proxy, and each Envoy's --concurrency (default 1)",
    )
    parser.add_argument(
        "--json", type=Path, help="write raw per-repeat figures and the summary here"
    )
    parser.add_argument(
        "--py-spy", type=output_dir, help="record py-spy profiles of the Weir proxies here"
    )
    args = parser.parse_args(argv)
    given = [
        flag
        for flag, key in (
            ("--repeats", "repeats"),
            ("--seconds", "seconds"),
            ("--bulk-mib", "bulk_mib"),
        )
        if getattr(args, key) is not None
    ]
    if args.quick and given:
        parser.error(f"--quick sets {', '.join(given)}: give one or the other")
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.size > 1 << 20:
        parser.error(f"--size {args.size} is above weir_load's 1 MiB")
    try:
        check_cpus(
            args.harness_cpu,
            args.middle_cpu,
            available_cpus if available_cpus is not None else os.sched_getaffinity(0),
        )
    except ValueError as e:
        parser.error(str(e))
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: no directory {args.json.parent}")
    if args.py_spy is not None and not (Path(sys.executable).parent / "py-spy").exists():
        parser.error(
            "--py-spy: no py-spy beside this interpreter (pip install py-spy, a dev dependency)"
        )
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    result = run_benchmark(args)
    print(report(args, result))
    if args.json is not None:
        args.json.write_text(json.dumps(document(args, sys.argv, result), indent=1) + "\n")
        print(f"raw figures: {args.json}")


if __name__ == "__main__":
    main()
