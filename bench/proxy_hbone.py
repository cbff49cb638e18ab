"""HBONE proxy benchmark (run by hand as root, not a test).

    .venv/bin/python bench/proxy_hbone.py [--seconds 5] [--bulk-mib 256] [--concurrency 16]

One run, three paths between two simulated nodes (LocalTopology, real CNI wiring):

- direct: pod c (node 1) -> pod d (node 2), no proxy;
- weir:   pod a (node 1, captured) -> 15001 of proxy 1 -> HBONE (mTLS, pooled) ->
          15008 of proxy 2 -> pod b (node 2, captured); each proxy its own process;
- envoy:  pod c -> Envoy in c (tcp_proxy + tunneling_config) -> HBONE -> Envoy in d
          (CONNECT termination) -> pod d; each Envoy one worker thread.

For each path: bulk throughput over one connection, request/response rate with
p50/p99 latency over one connection (64-byte ping-pong), and new connections
per second (connect, 1-byte echo, close, `--concurrency` in parallel); and for
each, the CPU time the two processes in the middle (proxies or Envoys) spent
per MiB, request or connection, which stays comparable when other work
shares the machine. The
load generator and the servers are the same uvloop programs on every path,
each in its own process, so only what sits in between differs. Results are
printed as a table with ratios weir/direct and weir/envoy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from controlplane.ca import load_or_create_root
from node_agent.localmesh.topology import LocalTopology
from node_agent.netns import Netns, entered
from node_agent.proxy.model import MeshSnapshot, MtlsMode, Workload
from node_agent.proxy.proxy import ProxySettings, build
from node_agent.proxy.telemetry import AccessLog
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.iptables import IptablesCapture
from testbed.proxy_fakes import LocalCaCertificates, StaticConfigSource
from testbed.proxy_lab import (
    TRUST_DOMAIN,
    EnvoyProcess,
    envoy_hbone_client,
    envoy_hbone_server,
    write_svid,
)
from weir_common.mesh import SpiffeId

ECHO_PORT, ENVOY_PORT = 8080, 15100
READY = "ready"


# -- child processes ----------------------------------------------------------


async def serve_apps(host: str) -> None:
    """Echo on 8080."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(262144):
                writer.write(data)
                await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(echo, host, ECHO_PORT, backlog=4096)]
    print(READY, flush=True)
    await _until_terminated()
    for server in servers:
        server.close()


async def run_proxy(config_path: str) -> None:
    """One node's proxy from a JSON description (what the node agent would hand it)."""
    config = json.loads(Path(config_path).read_text())
    ca = load_or_create_root(
        Path(config["ca_dir"]), TRUST_DOMAIN, now=datetime.datetime.now(datetime.UTC)
    )
    workloads = {
        w["namespace"] + "/" + w["name"]: Workload(
            **{**w, "ips": tuple(w["ips"]), "mtls_mode": MtlsMode(w["mtls_mode"])}
        )
        for w in config["workloads"]
    }
    snapshot = MeshSnapshot(TRUST_DOMAIN, tuple(ca.trust_bundle_pem), workloads=workloads)
    settings = dataclasses.replace(ProxySettings(), metrics_address=None, readiness_address=None)
    proxy = build(
        settings,
        config=StaticConfigSource(snapshot),
        certificates=LocalCaCertificates(ca),
        access_log=AccessLog(lambda _line: None),  # measured: the proxy, not a log writer
    )
    await proxy.start()
    for pod in config["pods"]:
        await proxy.add_pod(Netns.validate(pod["netns"]), workloads[pod["key"]])
    print(READY, flush=True)
    await _until_terminated()
    await proxy.shutdown(1.0)


async def _until_terminated() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def load(
    phase: str, host: str, port: int, seconds: float, bulk_mib: int, concurrency: int
) -> None:
    """One measurement against the echo server at host:port; prints its figures and `ops`
    (MiB moved each way, requests, or connections) to divide CPU time by."""
    if phase == "bulk":
        result = {"throughput_gbps": await _throughput(host, port, bulk_mib), "ops": bulk_mib}
    elif phase == "rr":
        result = await _request_response(host, port, seconds)
    else:
        result = await _new_connections(host, port, seconds, concurrency)
    print(json.dumps(result), flush=True)


async def _throughput(host: str, port: int, mib: int) -> float:
    """Bulk through the echo: `mib` MiB up and the same back, concurrently; counts one way."""
    reader, writer = await asyncio.open_connection(host, port)
    chunk = os.urandom(1 << 20)
    started = time.perf_counter()

    async def drain_echo() -> None:
        remaining = mib << 20
        while remaining > 0:
            data = await reader.read(1 << 20)
            if not data:
                raise ConnectionError("echo ended early")
            remaining -= len(data)

    drainer = asyncio.create_task(drain_echo())
    for _ in range(mib):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    await drainer
    elapsed = time.perf_counter() - started
    writer.close()
    return round(mib * 8 * 1.048576 / 1000 / elapsed, 3)


async def _request_response(host: str, port: int, seconds: float) -> dict[str, float]:
    reader, writer = await asyncio.open_connection(host, port)
    message = b"x" * 64
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        writer.write(message)
        await reader.readexactly(len(message))
        latencies.append(time.perf_counter() - sent)
    writer.close()
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "ops": len(latencies),
        "rr_per_s": round(len(latencies) / seconds),
        "rr_p50_us": round(quantiles[49] * 1e6, 1),
        "rr_p99_us": round(quantiles[98] * 1e6, 1),
    }


async def _new_connections(
    host: str, port: int, seconds: float, concurrency: int
) -> dict[str, float]:
    done = 0
    failures = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, failures
        while time.perf_counter() < deadline:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"!")
                await reader.readexactly(1)
                writer.close()
                done += 1
            except (OSError, asyncio.IncompleteReadError):
                failures += 1
                if failures > 1000:
                    raise

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"ops": done, "conns_per_s": round(done / (time.perf_counter() - started))}


# -- the harness ----------------------------------------------------------------


def spawn(netns: Netns | None, *args: str) -> subprocess.Popen[str]:
    """This script again, as a child (inside `netns` if given), once it says it is ready."""
    argv = [sys.executable, __file__, *args]
    with entered(netns) if netns is not None else contextlib.nullcontext():
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != READY:
        proc.kill()
        raise SystemExit(f"child {args[0]} failed to start (said {line!r})")
    return proc


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


CPU_UNITS = {"bulk": "cpu_ms_per_mib", "rr": "cpu_us_per_request", "conns": "cpu_us_per_conn"}
CPU_SCALE = {"bulk": 1e3, "rr": 1e6, "conns": 1e6}


def measure(
    netns: Netns, host: str, port: int, middle: list[int], args: argparse.Namespace
) -> dict[str, float]:
    """Every phase from inside `netns`, with the CPU the `middle` processes spent on it."""
    results: dict[str, float] = {}
    for phase in ("bulk", "rr", "conns"):
        before = cpu_seconds(middle)
        with entered(netns):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "load",
                    phase,
                    host,
                    str(port),
                    str(args.seconds),
                    str(args.bulk_mib),
                    str(args.concurrency),
                ],
                capture_output=True,
                text=True,
                timeout=args.seconds * 4 + 120,
                check=True,
            )
        figures = json.loads(out.stdout)
        ops = figures.pop("ops")
        spent = cpu_seconds(middle) - before
        figures[CPU_UNITS[phase]] = round(spent * CPU_SCALE[phase] / max(ops, 1), 1)
        results.update(figures)
    return results


def run_benchmark(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    children: list[subprocess.Popen[str]] = []
    envoys: list[EnvoyProcess] = []
    with LocalTopology() as topology:
        ca = load_or_create_root(work / "ca", TRUST_DOMAIN, now=datetime.datetime.now(datetime.UTC))
        capture = IptablesCapture(Backend.NFT)
        try:
            n1 = topology.add_node("node-1", "10.244.1.0/24")
            n2 = topology.add_node("node-2", "10.244.2.0/24")
            a, c = topology.add_pod(n1, "a"), topology.add_pod(n1, "c")
            b, d = topology.add_pod(n2, "b"), topology.add_pod(n2, "d")
            workloads = {}
            for pod, captured in ((a, True), (b, True), (c, False), (d, False)):
                workloads[pod.name] = Workload(
                    pod.uid,
                    pod.name,
                    "default",
                    pod.name,
                    pod.node.name,
                    (str(pod.ipv4),),
                    captured=captured,
                )
            for pod in (a, b):
                capture.apply(pod.netns, CaptureConfig())
            for node, pod in (("node-1", a), ("node-2", b)):
                config = work / f"{node}.json"
                config.write_text(
                    json.dumps(
                        {
                            "ca_dir": str(work / "ca"),
                            "workloads": [
                                {**dataclasses.asdict(w), "mtls_mode": w.mtls_mode.value}
                                for w in workloads.values()
                            ],
                            "pods": [{"key": f"default/{pod.name}", "netns": str(pod.netns.path)}],
                        },
                    )
                )
                stats = str(args.profile / f"{node}.prof") if args.profile else ""
                children.append(spawn(None, "proxy", str(config), stats))
            for pod in (b, d):
                children.append(spawn(pod.netns, "apps", str(pod.ipv4)))
            issuer = LocalCaCertificates(ca)
            bundle = ca.trust_bundle_pem
            d_ip = str(d.ipv4)
            client = EnvoyProcess(
                c.netns,
                envoy_hbone_client(
                    ENVOY_PORT,
                    tunnel_address=d_ip,
                    authority=f"{d_ip}:{ECHO_PORT}",
                    svid=write_svid(
                        work, "c", issuer.issue(SpiffeId(TRUST_DOMAIN, "default", "c")), bundle
                    ),
                    peer_identity=str(SpiffeId(TRUST_DOMAIN, "default", "d")),
                ),
                work,
                "envoy-c",
            )
            envoys.append(client)
            server = EnvoyProcess(
                d.netns,
                envoy_hbone_server(
                    listen_address=d_ip,
                    app_address=d_ip,
                    app_port=ECHO_PORT,
                    svid=write_svid(
                        work, "d", issuer.issue(SpiffeId(TRUST_DOMAIN, "default", "d")), bundle
                    ),
                ),
                work,
                "envoy-d",
            )
            envoys.append(server)
            client.wait_listening("127.0.0.1", ENVOY_PORT)
            server.wait_listening(d_ip, 15008)
            proxies = [child.pid for child in children[:2]]
            results = {
                "direct": measure(c.netns, d_ip, ECHO_PORT, [], args),
                "weir": measure(a.netns, str(b.ipv4), ECHO_PORT, proxies, args),
                "envoy": measure(c.netns, "127.0.0.1", ENVOY_PORT, [client.pid, server.pid], args),
            }
        finally:
            for envoy in envoys:
                envoy.close()
            for child in children:
                child.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=10)
            for pod in topology.pods:
                with contextlib.suppress(Exception):
                    capture.remove(pod.netns)
    report(results, args)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    rows = [
        ("bulk echo throughput (Gbit/s each way)", "throughput_gbps", True),
        ("req/resp per s (64 B, 1 conn)", "rr_per_s", True),
        ("req/resp p50 latency (us)", "rr_p50_us", False),
        ("req/resp p99 latency (us)", "rr_p99_us", False),
        (f"new connections per s (x{args.concurrency})", "conns_per_s", True),
        ("proxies' CPU ms per MiB (bulk)", "cpu_ms_per_mib", False),
        ("proxies' CPU us per request", "cpu_us_per_request", False),
        ("proxies' CPU us per new connection", "cpu_us_per_conn", False),
    ]
    header = ("direct", "weir", "envoy", "weir/direct", "weir/envoy")
    print(f"{'measure':36}" + "".join(f" {h:>11}" for h in header))
    for label, key, higher_is_better in rows:
        direct, weir, envoy = (results[p][key] for p in ("direct", "weir", "envoy"))
        vs_direct = f"{weir / direct:>11.2f}" if direct else f"{'-':>11}"
        print(
            f"{label:36} {direct:>11} {weir:>11} {envoy:>11} {vs_direct} {weir / envoy:>11.2f}"
            + ("" if higher_is_better else "  (lower is better)")
        )
    print(json.dumps(results))


def _profiled(run: Callable[[], None], stats_path: str) -> None:
    if not stats_path:
        run()
        return
    profiler = cProfile.Profile()
    profiler.runcall(run)
    profiler.dump_stats(stats_path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("apps", "proxy", "load"):
        role, rest = sys.argv[1], sys.argv[2:]
        if role == "apps":
            uvloop.run(serve_apps(rest[0]))
        elif role == "proxy":
            _profiled(lambda: uvloop.run(run_proxy(rest[0])), rest[1] if len(rest) > 1 else "")
        else:
            uvloop.run(
                load(rest[0], rest[1], int(rest[2]), float(rest[3]), int(rest[4]), int(rest[5]))
            )
        return
    run_benchmark(parse_args(sys.argv[1:]))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate measurement")
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--profile",
        type=profile_dir,
        help="write each proxy's cProfile stats into this directory (created if missing)",
    )
    return parser.parse_args(argv)


def profile_dir(value: str) -> Path:
    """Created now: the proxies write their stats only when they exit, after the run."""
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create {path}: {e.strerror}") from None
    return path


if __name__ == "__main__":
    main()
