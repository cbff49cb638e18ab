"""Capture mode benchmark: no capture vs iptables vs eBPF, in microseconds (run by hand, as root).

    .venv/bin/python bench/capture_modes.py [--repeats 5] [--connects 1000] [--seconds 1]
        [--size 1] [--concurrency 1] [--cpus 1,1,1 | --cpus none] [--json PATH]

Builds a throwaway node with two pods (client and server) from the local
topology harness and, for each mode, runs bench/native/capture_client.c
inside the client pod against an echo server in the server pod
(bench/native/weir_echo.c). Each measurement has three phases:

- latency: --connects connections one after another (--concurrency at a
  time): connect, send --size bytes, read the echo, close; per connection
  the connect() time and the connect + request/response time, in ns;
- new connections per second: connect, one request/response, close, for
  --seconds;
- request/response per second on one connection, for --seconds.

"none" connects straight to the server. "iptables" and "ebpf" capture the
client pod exactly as the node agent does (IptablesCapture with the nft
backend, EbpfCapture with its programs installed once), and the stand-in
proxy (capture_standin.c on 15001) does what the node proxy does before its
own work: getsockopt(SO_ORIGINAL_DST), which both modes answer, an upstream
socket with the proxy mark so capture lets it through, then a plain relay.
So what differs between the two captured modes is only how the connection
is steered, and what both add over "none" is the steering plus one relay
hop. The stand-in counts what it accepted; each sample records how many
connections it took, so a captured run that bypassed it shows.

Client, stand-in and echo server are pinned (--cpus, default all three on
CPU 1; the C programs pin themselves, the echo server runs under taskset):
on a VM, waking a process on another, idle vCPU costs a hypervisor round
trip (about 100-200 us here), which would swamp the microseconds the
capture path costs. On one CPU the numbers are the path's own CPU cost.

Each mode runs --repeats times, interleaved (none, iptables, ebpf, none,
...) so drift hits all alike; the table shows medians and ratios to "none".
Everything is bounded: each client run has a time budget, the client has
its own hard limit and connect timeout. A run with any failed connection
is reported and the bench exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent import netns as netns_mod
from node_agent.constants import OUTBOUND_CAPTURE_PORT, PROXY_MARK
from node_agent.localmesh.topology import LocalTopology, Pod
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import BPFFS, PinLayout
from node_agent.redirect.iptables import IptablesCapture
from node_agent.redirect.modes import CaptureMode
from testbed.native import build

SERVER_PORT = 8080
MODES = ("none", "iptables", "ebpf")
# One sample's figures, in the order the table and the JSON use.
METRICS = (
    "connect_rr_p50_us",
    "connect_rr_p99_us",
    "connect_p50_us",
    "connect_p99_us",
    "conn_per_s",
    "rr_per_s",
    "failures",
    "connections",
    "standin_accepted",
)
HELPER_START_SECONDS = 10.0
COUNTERS_SECONDS = 5.0


@dataclass(frozen=True)
class Settings:
    connects: int = 1000
    seconds: float = 1.0
    size: int = 1
    concurrency: int = 1
    connect_timeout_ms: int = 2000

    def client_flags(self) -> list[str]:
        return [
            "--connects", str(self.connects),
            "--concurrency", str(self.concurrency),
            "--size", str(self.size),
            "--rate-seconds", f"{self.seconds:g}",
            "--rr-seconds", f"{self.seconds:g}",
            "--timeout-ms", str(self.connect_timeout_ms),
            "--max-seconds", str(int(self.budget())),
        ]  # fmt: skip

    def budget(self) -> float:
        """Seconds a client run may take: both timed phases, 10 ms a connect (~100x), slack."""
        return 10 + 2 * self.seconds + self.connects * 0.01


@dataclass(frozen=True)
class Cpus:
    """Where each process runs; None leaves it to the scheduler."""

    client: int | None
    standin: int | None
    echo: int | None


def parse_cpus(text: str, allowed: set[int]) -> Cpus:
    """'C,S,E' (client, stand-in, echo) or 'none'; each CPU must be one this process may use."""
    if text == "none":
        return Cpus(None, None, None)
    parts = text.split(",")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--cpus wants 'client,standin,echo' CPU numbers or 'none', got {text!r}")
    values = [int(p) for p in parts]
    outside = sorted(set(values) - allowed)
    if outside:
        raise ValueError(f"--cpus names CPU {outside} outside this process's {sorted(allowed)}")
    return Cpus(*values)


def cpu_flags(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["--cpu", str(cpu)]


def sample(client_doc: Mapping[str, Any], standin_accepted: int) -> dict[str, float]:
    """One run's figures from capture_client's JSON and the stand-in's accept count."""
    try:
        latency, rate, rr = client_doc["latency"], client_doc["rate"], client_doc["rr"]
        failures = latency["failures"] + rate["failures"] + rr["failures"]
        total, connect = latency["connect_rr_us"], latency["connect_us"]
        if total["p50"] is None:
            raise ValueError("capture_client: no connection of the latency phase succeeded")
        return {
            "connect_rr_p50_us": float(total["p50"]),
            "connect_rr_p99_us": float(total["p99"]),
            "connect_p50_us": float(connect["p50"]),
            "connect_p99_us": float(connect["p99"]),
            "conn_per_s": float(rate["per_s"]),
            "rr_per_s": float(rr["per_s"]),
            "failures": float(failures),
            "connections": float(client_doc["connections"]),
            "standin_accepted": float(standin_accepted),
        }
    except (KeyError, TypeError) as e:
        raise ValueError(f"capture_client output lacks {e}: {json.dumps(client_doc)}") from None


def medians(raw: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Per mode, the median of each figure over its repeats (failures: the total)."""
    out: dict[str, dict[str, float]] = {}
    for mode, samples in raw.items():
        if not samples:
            raise ValueError(f"mode {mode} has no samples")
        out[mode] = {k: statistics.median(s[k] for s in samples) for k in METRICS}
        out[mode]["failures"] = sum(s["failures"] for s in samples)
    return out


def render_table(med: Mapping[str, Mapping[str, float]], repeats: int, settings: Settings) -> str:
    """The human table: microseconds, rates, and each mode against "none"."""
    base = med["none"]
    lines = [
        f"medians of {repeats} interleaved repeats; latency over {settings.connects} connects "
        f"(concurrency {settings.concurrency}, {settings.size}-byte echo), "
        f"rates over {settings.seconds:g} s",
        f"{'mode':9} {'conn+rr p50':>11} {'p99':>8} {'added':>7} {'connect p50':>11} "
        f"{'new conn/s':>10} {'rr/s':>8} {'fail':>5}   vs none",
        f"{'':9} {'us':>11} {'us':>8} {'us':>7} {'us':>11}",
    ]
    for mode, v in med.items():
        added = v["connect_rr_p50_us"] - base["connect_rr_p50_us"]
        ratios = (
            f"p50 x{v['connect_rr_p50_us'] / base['connect_rr_p50_us']:.2f} "
            f"p99 x{v['connect_rr_p99_us'] / base['connect_rr_p99_us']:.2f} "
            f"conn/s x{v['conn_per_s'] / base['conn_per_s']:.2f} "
            f"rr/s x{v['rr_per_s'] / base['rr_per_s']:.2f}"
        )
        lines.append(
            f"{mode:9} {v['connect_rr_p50_us']:11.1f} {v['connect_rr_p99_us']:8.1f} "
            f"{added:+7.1f} {v['connect_p50_us']:11.1f} {v['conn_per_s']:10.0f} "
            f"{v['rr_per_s']:8.0f} {v['failures']:5.0f}   {ratios}"
        )
    if "iptables" in med and "ebpf" in med:
        ipt, ebpf = med["iptables"], med["ebpf"]
        base_p50 = base["connect_rr_p50_us"]
        lines.append(
            f"ebpf vs iptables: added us per connection "
            f"{ebpf['connect_rr_p50_us'] - base_p50:+.1f} "
            f"vs {ipt['connect_rr_p50_us'] - base_p50:+.1f}, "
            f"new conn/s x{ebpf['conn_per_s'] / ipt['conn_per_s']:.2f}, "
            f"rr/s x{ebpf['rr_per_s'] / ipt['rr_per_s']:.2f}"
        )
    return "\n".join(lines)


def report(
    raw: Mapping[str, Sequence[Mapping[str, float]]],
    *,
    settings: Settings,
    cpus: Cpus,
    repeats: int,
    when: datetime.datetime,
    machine: Mapping[str, Any],
    command: Sequence[str],
) -> dict[str, Any]:
    """What --json writes: the setting, every sample, and the medians."""
    return {
        "date": when.isoformat(timespec="seconds"),
        "machine": dict(machine),
        "command": list(command),
        "repeats": repeats,
        "settings": {
            "connects": settings.connects,
            "seconds": settings.seconds,
            "size": settings.size,
            "concurrency": settings.concurrency,
            "connect_timeout_ms": settings.connect_timeout_ms,
            "cpus": {"client": cpus.client, "standin": cpus.standin, "echo": cpus.echo},
        },
        "raw": {m: [dict(s) for s in samples] for m, samples in raw.items()},
        "medians": medians(raw),
    }


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_avg": list(os.getloadavg()),
    }


class Helper:
    """A helper (stand-in or echo) running inside a pod until stopped; it prints "ready".

    The stand-in also answers SIGUSR1 with its counters and prints them at SIGTERM.
    """

    def __init__(self, name: str, pod: Pod, argv: Sequence[str]) -> None:
        with netns_mod.entered(pod.netns):
            self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True)
        self.name = f"{name} in {pod.name}"
        try:
            line = self._line(HELPER_START_SECONDS)
        except BaseException:
            self.stop()
            raise
        if line != "ready":
            self.stop()
            raise RuntimeError(f"{self.name} did not start (said {line!r})")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{self.name} said nothing within {timeout:g} s")
        return self.proc.stdout.readline().strip()

    def counters(self) -> dict[str, int]:
        """The stand-in's counters so far (accepted, completed, failures...)."""
        self.proc.send_signal(signal.SIGUSR1)
        line = self._line(COUNTERS_SECONDS)
        try:
            return {k: int(v) for k, v in json.loads(line).items()}
        except ValueError:
            raise RuntimeError(f"{self.name} sent unreadable counters {line!r}") from None

    def settled(self, timeout: float = 5.0) -> dict[str, int]:
        """The stand-in's counters once no connection is open any more (the last FIN relayed)."""
        deadline = time.monotonic() + timeout
        while (counters := self.counters())["open"] and time.monotonic() < deadline:
            time.sleep(0.02)
        if counters["open"]:
            raise RuntimeError(f"{self.name} still holds {counters['open']} connections")
        return counters

    def stop(self) -> dict[str, int] | None:
        """SIGTERM; the final counters if it printed them (the stand-in does), else None."""
        if self.proc.poll() is not None:
            return None
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            return None
        lines = out.strip().splitlines()
        try:
            return {k: int(v) for k, v in json.loads(lines[-1]).items()}
        except (IndexError, ValueError, AttributeError):
            return None


@contextlib.contextmanager
def running(name: str, pod: Pod, argv: Sequence[str]) -> Iterator[Helper]:
    helper = Helper(name, pod, argv)
    try:
        yield helper
    finally:
        helper.stop()


@contextlib.contextmanager
def capture(mode: str, pod: Pod, pins: PinLayout) -> Iterator[None]:
    """The pod captured as the node agent captures it in `mode` ("none": untouched)."""
    if mode == "none":
        yield
        return
    if mode not in MODES:
        raise ValueError(f"unknown capture mode {mode!r}; known: {', '.join(MODES)}")
    engine: CaptureMode = IptablesCapture(Backend.NFT) if mode == "iptables" else EbpfCapture(pins)
    try:
        engine.apply(pod.netns, CaptureConfig())
        try:
            yield
        finally:
            engine.remove(pod.netns)
    finally:
        if isinstance(engine, EbpfCapture):
            engine.close()


def prepare_client_pod(pod: Pod) -> None:
    """Reuse TIME_WAIT ports for new outbound connections in the client pod.

    The client closes first, and so does the stand-in's upstream side; a
    rate phase opens thousands of connections a second from one address to
    one address:port, which would run out of the 28k ephemeral ports within
    a few repeats while their TIME_WAIT lasts 60 s.
    """
    proc = netns_mod.run(pod.netns, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
    if proc.returncode != 0:
        raise RuntimeError(f"cannot set tcp_tw_reuse in {pod.name}: {proc.stderr.strip()}")


def measure(
    client_binary: Path,
    client: Pod,
    server_ip: str,
    settings: Settings,
    cpu: int | None,
    *,
    port: int = SERVER_PORT,
) -> dict[str, Any]:
    """One capture_client run inside the client pod; its JSON output."""
    argv = [
        str(client_binary),
        "--host", server_ip,
        "--port", str(port),
        *settings.client_flags(),
        *cpu_flags(cpu),
    ]  # fmt: skip
    # The client's own limit (--max-seconds) ends it first, with a status of its own.
    proc = netns_mod.run(client.netns, argv, timeout=settings.budget() + 5)
    if proc.returncode != 0:
        raise RuntimeError(f"capture_client failed ({proc.returncode}): {proc.stderr.strip()}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@dataclass(frozen=True)
class Programs:
    client: Path
    standin: Path
    echo: Path


def build_programs() -> Programs:
    return Programs(
        client=build("capture_client"), standin=build("capture_standin"), echo=build("weir_echo")
    )


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """argv run on `cpu` (taskset), for programs without a pinning flag of their own."""
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


@dataclass(frozen=True)
class Bench:
    """What one benchmark topology holds while it is up."""

    prefix: str  # of every netns and link it made
    pins: PinLayout
    client: Pod
    server: Pod
    standin: Helper


@contextlib.contextmanager
def bench_pods(programs: Programs, cpus: Cpus) -> Iterator[Bench]:
    """A fresh topology: client and server pods, echo and stand-in running, eBPF programs installed.

    Everything is undone when the block ends, whatever happened inside.
    """
    pins = PinLayout(BPFFS / f"weirbench-{uuid.uuid4().hex[:8]}")
    try:
        with LocalTopology() as topo:
            node = topo.add_node("node-1", "10.244.1.0/24")
            client, server = topo.add_pod(node, "client"), topo.add_pod(node, "server")
            prepare_client_pod(client)
            # Compiled and attached once, outside the timed runs; apply/remove per run is cheap.
            loader.install(pins)
            echo_argv = [str(programs.echo), "--addr", str(server.ipv4), "--port", str(SERVER_PORT)]
            relay_argv = [
                str(programs.standin),
                "--port", str(OUTBOUND_CAPTURE_PORT),
                "--mark", str(PROXY_MARK),
            ]  # fmt: skip
            with (
                running("weir_echo", server, pinned(echo_argv, cpus.echo)),
                running(
                    "capture_standin", client, [*relay_argv, *cpu_flags(cpus.standin)]
                ) as standin,
            ):
                yield Bench(topo.prefix, pins, client, server, standin)
    finally:
        loader.uninstall(pins)


def run_mode(
    mode: str, programs: Programs, bench: Bench, settings: Settings, cpus: Cpus
) -> dict[str, float]:
    """One measurement of `mode`, with how many connections the stand-in took meanwhile."""
    before = bench.standin.counters()["accepted"]
    with capture(mode, bench.client, bench.pins):
        doc = measure(programs.client, bench.client, str(bench.server.ipv4), settings, cpus.client)
    return sample(doc, bench.standin.counters()["accepted"] - before)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--connects", type=int, default=Settings.connects)
    parser.add_argument("--seconds", type=float, default=Settings.seconds)
    parser.add_argument("--size", type=int, default=Settings.size)
    parser.add_argument("--concurrency", type=int, default=Settings.concurrency)
    parser.add_argument("--cpus", default="1,1,1", help="client,standin,echo CPUs, or 'none'")
    parser.add_argument("--json", type=Path, help="write raw samples and medians here")
    args = parser.parse_args(argv)
    if not (
        1 <= args.repeats <= 20
        and 10 <= args.connects <= 100_000
        and 0.2 <= args.seconds <= 10
        and 1 <= args.size <= 65536
        and 1 <= args.concurrency <= 64
    ):
        parser.error(
            "keep it bounded: repeats 1-20, connects 10-100000, seconds 0.2-10, "
            "size 1-65536, concurrency 1-64"
        )
    try:
        args.cpus = parse_cpus(args.cpus, os.sched_getaffinity(0))
    except ValueError as e:
        parser.error(str(e))
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: directory {args.json.parent} does not exist")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        connects=args.connects,
        seconds=args.seconds,
        size=args.size,
        concurrency=args.concurrency,
    )
    programs = build_programs()
    raw: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    # Before the run: the load the other tenants of the machine put on it.
    machine = machine_facts()
    when = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    with bench_pods(programs, args.cpus) as bench:
        for repeat in range(args.repeats):
            for mode in MODES:
                s = run_mode(mode, programs, bench, settings, args.cpus)
                raw[mode].append(s)
                print(f"repeat {repeat + 1} {mode:8} {json.dumps(s)}", file=sys.stderr)
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    print(render_table(medians(raw), args.repeats, settings))
    load_after = list(os.getloadavg())
    print(
        f"1-min load average {machine['load_avg'][0]:.2f} before, {load_after[0]:.2f} after "
        f"({os.cpu_count()} CPUs, {machine['kernel']})"
    )
    if args.json is not None:
        doc = report(
            raw,
            settings=settings,
            cpus=args.cpus,
            repeats=args.repeats,
            when=when,
            machine={**machine, "load_avg_after": load_after},
            command=sys.argv,
        )
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    failures = sum(s["failures"] for samples in raw.values() for s in samples)
    if failures:
        print(
            f"{failures:.0f} connections failed: the figures above are not valid", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
