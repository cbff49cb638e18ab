"""Soak: a local mesh under mixed traffic, pod churn and proxy upgrades (as root).

    .venv/bin/python bench/soak.py [--minutes 30] [--upgrade-every 300] [--out soak.json]

Two nodes with the real agents, proxies and control plane (the local mesh).
For the whole run:
- client (node-1) -> server (node-2) through both proxies: --rate new
  connections per second, each echoing a token, and a long-lived echo
  connection started every 2 s that lasts 4 s (less than the proxies'
  5 s drain, so an upgrade must not cut any of them);
- pod churn: every --churn-every seconds one of the churn pods on node-1 is
  created (CNI ADD through the real chain) or deleted;
- every --upgrade-every seconds one node's proxy is upgraded, the nodes
  taking turns, the way the DaemonSet rolls (successor first).

Every 10 s it samples the resident memory and open file descriptors of the
control plane, each agent and each node's current proxy. After the warm-up
(the first upgrade period), the median of the last period is compared with
the median of the first: each must be within --tolerance (5 %; a count of
file descriptors may also be one above it). It prints a
table and exits 1 when anything grew past it, a connection failed, a
long-lived connection was reset, or a churn pod could not be enrolled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from node_agent.localmesh.cni_runtime import CniPluginError
from node_agent.localmesh.mesh import REPO, LocalMesh, Process, real_proxy, spawn
from node_agent.localmesh.topology import Pod
from testbed.traffic_load import wait_serving

CONFIG: Final = REPO / "examples" / "mesh.yaml"
PORT: Final = 8080
ROUND_S: Final = 60.0
SAMPLE_EVERY_S: Final = 10.0
DRAIN_S: Final = 5.0
CHURN_PODS: Final = 4
LOAD: Final = [sys.executable, "-m", "testbed.traffic_load"]


@dataclass(frozen=True)
class Verdict:
    component: str
    measure: str
    first: float
    last: float
    peak: float

    @property
    def change(self) -> float:
        return self.last / self.first - 1 if self.first else 0.0

    def grew(self, tolerance: float) -> bool:
        """Past `tolerance`; a file descriptor count may also be one above it.

        A process with 18 descriptors holds 19 whenever one connection is
        being set up; a leak shows as steady growth, well past one.
        """
        slack = 1.0 if self.measure == "fds" else 0.0
        return self.last > self.first * (1 + tolerance) + slack


def flatness(
    samples: Sequence[tuple[float, str, str, float]], warm_up_s: float, window_s: float
) -> list[Verdict]:
    """Per (component, measure): median of the first window after warm-up vs the last window.

    `samples` are (seconds since start, component, measure, value). A series
    without samples in both windows is left out: the run was too short to judge it.
    """
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for t, component, measure, value in samples:
        series.setdefault((component, measure), []).append((t, value))
    verdicts = []
    for (component, measure), points in sorted(series.items()):
        end = max(t for t, _ in points)
        first = [v for t, v in points if warm_up_s <= t < warm_up_s + window_s]
        last = [v for t, v in points if t > end - window_s and t >= warm_up_s + window_s]
        if not first or not last:
            continue
        peak = max(v for t, v in points if t >= warm_up_s)
        verdicts.append(
            Verdict(component, measure, statistics.median(first), statistics.median(last), peak)
        )
    return verdicts


def _process_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
    )
    fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return {"rss_mib": rss_kib / 1024, "fds": float(fds)}


@dataclass
class Totals:
    new_attempted: int = 0
    new_failed: int = 0
    long_lived: int = 0
    long_lived_reset: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    resets: list[str] = field(default_factory=list)
    upgrades: int = 0
    churn_adds: int = 0
    churn_deletes: int = 0
    churn_failures: list[str] = field(default_factory=list)

    def add(self, report: Mapping[str, Any]) -> None:
        self.new_attempted += report["new_attempted"]
        self.new_failed += report["new_failed"]
        self.long_lived += report["long_lived"]
        self.long_lived_reset += report["long_lived_reset"]
        for reason, count in report["new_failures"].items():
            self.failures[reason] = self.failures.get(reason, 0) + count
        self.resets += report["long_lived_resets"]


def _soak_config(work: Path) -> Path:
    """The demo mesh plus churn pods (declared, as local mode requires)."""
    doc = yaml.safe_load(CONFIG.read_text())
    for i in range(CHURN_PODS):
        doc["workloads"].append(
            {
                "name": f"churn-{i}",
                "namespace": "default",
                "serviceAccount": "churn",
                "node": "node-1",
                "labels": {"app": "churn"},
            }
        )
    path = work / "soak-mesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Soak:
    def __init__(self, local: LocalMesh, client: Pod, server: Pod, rate: float) -> None:
        self.local = local
        self.client = client
        self.server = server
        self.rate = rate
        self.totals = Totals()
        self.samples: list[tuple[float, str, str, float]] = []
        self.loads: list[Process] = []
        self.churn: dict[int, Pod] = {}
        self.started = time.monotonic()

    def start_round(self) -> None:
        self.loads.append(
            spawn(
                self.client.netns,
                f"load-{len(self.loads)}",
                [
                    *LOAD,
                    "drive",
                    "--target",
                    f"{self.server.ipv4}:{PORT}",
                    "--rate",
                    str(self.rate),
                    "--seconds",
                    str(ROUND_S),
                    "--long-lived-every",
                    "2",
                    "--long-lived-for",
                    "4",
                ],
                self.local.work,
            )
        )

    def collect(self, *, wait: bool) -> None:
        for load in list(self.loads):
            if wait:
                load.popen.wait(ROUND_S + 60)
            if load.popen.poll() is None:
                continue
            self.loads.remove(load)
            lines = load.log.read_text().strip().splitlines()
            if load.popen.returncode != 0 or not lines:
                raise RuntimeError(f"load generator failed:\n{load.tail()}")
            self.totals.add(json.loads(lines[-1]))

    def churn_step(self, step: int) -> None:
        i = step % CHURN_PODS
        name = f"churn-{i}"
        try:
            if i in self.churn:
                self.local.topology.remove_pod(self.churn.pop(i))
                self.totals.churn_deletes += 1
            else:
                self.churn[i] = self.local.add_pod("node-1", name)
                self.totals.churn_adds += 1
        except CniPluginError as e:
            self.totals.churn_failures.append(f"{name} at {self.elapsed():.0f}s: {e}")

    def upgrade(self) -> None:
        node = ("node-1", "node-2")[self.totals.upgrades % 2]
        self.local.upgrade_proxy(node)
        self.totals.upgrades += 1

    def sample(self) -> None:
        t = self.elapsed()
        processes: dict[str, Process | None] = {"controlplane": self.local.controlplane}
        for name, node in self.local.nodes.items():
            processes[f"agent {name}"] = node.agent
            processes[f"proxy {name}"] = node.proxy
        for component, process in processes.items():
            if process is None or process.popen.poll() is not None:
                continue
            try:
                measured = _process_sample(process.popen.pid)
            except (OSError, StopIteration):
                continue  # it exited between the check and the read
            for measure, value in measured.items():
                self.samples.append((t, component, measure, value))

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="weir-soak-"))
    try:
        config = _soak_config(work)
        with LocalMesh(config, real_proxy, proxy_drain_seconds=DRAIN_S) as local:
            local.add_node("node-1", "10.244.1.0/24")
            local.add_node("node-2", "10.244.2.0/24")
            client = local.add_pod("node-1", "client")
            server = local.add_pod("node-2", "server")
            echo = spawn(server.netns, "echo", [*LOAD, "serve", "--port", str(PORT)], local.work)
            try:
                wait_serving(server.netns, PORT)
                soak = Soak(local, client, server, args.rate)
                _drive(soak, args)
            finally:
                echo.stop()
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return _report(soak, args)


def _drive(soak: Soak, args: argparse.Namespace) -> None:
    end = args.minutes * 60
    next_round = next_sample = next_churn = 0.0
    next_upgrade = args.upgrade_every
    churn_steps = 0
    while (now := soak.elapsed()) < end:
        if now >= next_round and now + ROUND_S <= end + 1:
            soak.start_round()
            next_round += ROUND_S
        if now >= next_sample:
            soak.sample()
            next_sample += SAMPLE_EVERY_S
        if now >= next_churn:
            soak.churn_step(churn_steps)
            churn_steps += 1
            next_churn += args.churn_every
        if now >= next_upgrade:
            soak.upgrade()
            next_upgrade += args.upgrade_every
        soak.collect(wait=False)
        if now > 60 and now // 60 != (now - 0.2) // 60:
            print(f"{now / 60:.0f} min: {json.dumps(asdict(soak.totals))[:300]}", flush=True)
        time.sleep(0.2)
    soak.collect(wait=True)


def _report(soak: Soak, args: argparse.Namespace) -> int:
    verdicts = flatness(soak.samples, args.upgrade_every, args.upgrade_every)
    t = soak.totals
    print(
        f"\nsoak: {args.minutes:g} min, {t.new_attempted} new connections "
        f"({t.new_failed} failed), {t.long_lived} long-lived ({t.long_lived_reset} reset), "
        f"{t.upgrades} proxy upgrades, {t.churn_adds} pod ADDs, {t.churn_deletes} DELs "
        f"({len(t.churn_failures)} failed)"
    )
    print(f"{'component':<16} {'measure':<7} {'first':>9} {'last':>9} {'peak':>9} {'change':>8}")
    for v in verdicts:
        print(
            f"{v.component:<16} {v.measure:<7} {v.first:>9.1f} {v.last:>9.1f} "
            f"{v.peak:>9.1f} {v.change:>+8.1%}"
        )
    grown = [v for v in verdicts if v.grew(args.tolerance)]
    problems = [f"{v.component} {v.measure} grew {v.change:+.1%}" for v in grown]
    if not verdicts:
        problems.append("too short to judge: no samples after the warm-up in two windows")
    if t.new_failed:
        problems.append(f"{t.new_failed} new connections failed: {t.failures}")
    if t.long_lived_reset:
        problems.append(f"{t.long_lived_reset} long-lived connections reset: {t.resets[:5]}")
    if t.churn_failures:
        problems.append(f"churn pods failed: {t.churn_failures[:5]}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "totals": asdict(t),
                    "verdicts": [asdict(v) | {"change": v.change} for v in verdicts],
                    "samples": soak.samples,
                    "problems": problems,
                },
                indent=1,
            )
        )
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--upgrade-every", type=float, default=300.0, metavar="SECONDS")
    parser.add_argument("--churn-every", type=float, default=15.0, metavar="SECONDS")
    parser.add_argument("--rate", type=float, default=100.0, help="new connections per second")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--out", type=Path)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
