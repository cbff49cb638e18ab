"""Control plane push benchmark (run by hand, not a test).

    .venv/bin/python bench/controlplane_push.py [--nodes 1000] [--workloads 10000]

Starts `weir controlplane` (controlplane.cli.main, TLS as deployed) in its own
process on a generated mesh, opens one delta ADS subscription (Workload type,
wildcard) per node from several client processes, waits for every initial
sync, then changes one workload several times through the registration API
(as its node) and reports, per change, how long it took to reach every
subscriber (p50/p99/max over subscribers), plus the control plane's CPU time
and memory (sampled every 0.1 s: peak and steady RSS).

Every wait is bounded. If subscriptions do not all sync, the run says how many
are still waiting for their first push, how many failed (by gRPC status) and
how many the server ended, then exits 1 instead of waiting forever.
"""

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

from controlplane.ca import ROOT_CERT_FILE
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import ControlPlaneClient
from weir_common import xds_transport
from weir_common.mesh import WORKLOAD_TYPE, auth_metadata

CHANGED = "bench/w-0"


def token(node: int) -> str:
    return f"bench-token-for-node-{node:05d}"


def mesh_yaml(nodes: int, workloads: int) -> str:
    lines = ["trustDomain: cluster.local", "nodes:"]
    lines += [f"  - {{name: node-{n}, bootstrapToken: {token(n)}}}" for n in range(nodes)]
    lines.append("workloads:")
    for w in range(workloads):
        ip = f"10.{w // 65536 + 1}.{w // 256 % 256}.{w % 256}"
        lines.append(
            f"  - {{name: w-{w}, namespace: bench, serviceAccount: sa-{w % 100}, "
            f"node: node-{w % nodes}, ips: [{ip}], labels: {{app: app-{w % 100}}}}}"
        )
    lines += ["services:"]
    lines += [
        f"  - {{name: svc-{s}, namespace: bench, vips: [10.96.{s // 256}.{s % 256}], "
        f"selector: {{app: app-{s}}}, ports: [{{port: 80}}]}}"
        for s in range(100)
    ]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_and_memory(pid: int) -> tuple[float, int, int]:
    """CPU seconds (user+system), current RSS and peak RSS in MiB."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return cpu, int(status["VmRSS"].split()[0]) // 1024, int(status["VmHWM"].split()[0]) // 1024


class MemorySampler:
    """RSS of the control plane every `interval` seconds, in a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.samples.append((time.monotonic(), cpu_and_memory(self._pid)[1]))
            except (OSError, ValueError):
                return  # the control plane exited

    def peak_since(self, start: float) -> int:
        return max((rss for t, rss in self.samples if t >= start), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def connected_nodes(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("weir_controlplane_connected_nodes "):
                return int(float(line.split()[1]))
    return -1


# -- client processes -----------------------------------------------------------

# What each subscription is doing, as reported back to the parent.
WAITING, SYNCED, ENDED = "waiting for first push", "synced", "ended by server"


def client_process(target, root_pem, nodes, conn, channels, sync_timeout) -> None:
    asyncio.run(_client_main(target, root_pem, nodes, conn, channels, sync_timeout))


async def _client_main(target, root_pem, nodes, conn, channels, sync_timeout) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
    # A distinct argument per channel: otherwise gRPC shares one subchannel
    # (one TCP connection) between channels to the same target.
    chans = [
        grpc.aio.secure_channel(target, credentials, options=[("weir.bench.channel", i)])
        for i in range(channels)
    ]
    arrivals: dict[int, list[float]] = {n: [] for n in nodes}
    state = dict.fromkeys(nodes, WAITING)
    settled = asyncio.Event()  # every subscription synced or failed

    def note(node: int, what: str) -> None:
        state[node] = what
        if WAITING not in state.values():
            settled.set()

    async def subscribe(index: int, node: int) -> None:
        method = chans[index % channels].stream_stream(
            xds_transport.DELTA_METHOD,
            request_serializer=xds_transport.passthrough,
            response_deserializer=xds_transport.decode_response,
        )
        call = method(None, metadata=auth_metadata(token(node)))
        try:
            await call.write(
                xds_transport.encode_request(node_id=f"node-{node}", type_url=WORKLOAD_TYPE)
            )
            async for response in call:
                now = time.time()
                if state[node] == WAITING:
                    note(node, SYNCED)
                elif any(r.name == CHANGED for r in response.resources):
                    arrivals[node].append(now)
                await call.write(
                    xds_transport.encode_request(
                        node_id=f"node-{node}",
                        type_url=WORKLOAD_TYPE,
                        response_nonce=response.nonce,
                    )
                )
        except grpc.aio.AioRpcError as exc:
            note(node, f"failed: {exc.code().name}")
            print(f"node-{node}: {exc.code().name} {exc.details()}", file=sys.stderr)
        else:
            note(node, ENDED)

    tasks = [asyncio.create_task(subscribe(i, n)) for i, n in enumerate(nodes)]
    try:
        async with asyncio.timeout(sync_timeout):
            await settled.wait()
    except TimeoutError:
        pass
    conn.send(Counter(state.values()))
    loop = asyncio.get_running_loop()
    if await loop.run_in_executor(None, conn.recv) == "report":
        conn.send(arrivals)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for chan in chans:
        await chan.close()


# -- the run ---------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--workloads", type=int, default=10000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--channels", type=int, default=10, help="TCP connections per process")
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--sync-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--change-timeout", type=float, default=30.0, help="seconds")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    config = workdir / "mesh.yaml"
    config.write_text(mesh_yaml(args.nodes, args.workloads))
    grpc_port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    plane = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from controlplane.cli import main; sys.exit(main())",
            "--config",
            str(config),
            "--listen",
            target,
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--state-dir",
            str(workdir / "state"),
            "--log-level",
            "WARNING",
        ],
    )
    try:
        return run(args, plane, target, http_port, workdir / "state" / ROOT_CERT_FILE)
    finally:
        plane.send_signal(signal.SIGTERM)
        try:
            plane.wait(timeout=30)
        except subprocess.TimeoutExpired:
            plane.kill()
            plane.wait(timeout=10)


def run(args, plane, target, http_port, root_file) -> int:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz/ready", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or plane.poll() is not None:
                print("control plane did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.2)
    sampler = MemorySampler(plane.pid)
    try:
        return measure(args, plane, target, http_port, root_file, sampler)
    finally:
        sampler.stop()


def measure(args, plane, target, http_port, root_file, sampler) -> int:
    cpu0, rss0, _ = cpu_and_memory(plane.pid)
    print(f"control plane ready: {args.workloads} workloads, {args.nodes} nodes; RSS {rss0} MiB")

    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    t0 = time.monotonic()
    root_pem = root_file.read_bytes()
    for p in range(args.processes):
        parent, child = ctx.Pipe()
        nodes = list(range(p, args.nodes, args.processes))
        proc = ctx.Process(
            target=client_process,
            args=(target, root_pem, nodes, child, args.channels, args.sync_timeout),
        )
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        return _after_start(args, plane, target, root_pem, http_port, sampler, pipes, t0, cpu0)
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _after_start(args, plane, target, root_pem, http_port, sampler, pipes, t0, cpu0) -> int:
    states: Counter[str] = Counter()
    deadline = t0 + args.sync_timeout + 30
    pending = list(pipes)
    while pending:
        pending = [pipe for pipe in pending if not pipe.poll(5)]
        for pipe in pipes:
            if pipe not in pending and pipe.poll(0):
                states.update(pipe.recv())
        if pending:
            print(
                f"  {time.monotonic() - t0:5.0f} s: {connected_nodes(http_port)} streams open "
                "on the control plane"
            )
        if time.monotonic() > deadline:
            print("client processes did not report (crashed or hung)", file=sys.stderr)
            return 1
    sync_seconds = time.monotonic() - t0
    cpu1, rss1, _ = cpu_and_memory(plane.pid)
    sync_peak = sampler.peak_since(t0)
    if states[SYNCED] != args.nodes:
        print(
            f"initial sync FAILED after {sync_seconds:.0f} s: "
            + ", ".join(f"{n} {what}" for what, n in sorted(states.items())),
            file=sys.stderr,
        )
        return 1
    print(
        f"initial sync of {args.nodes} subscriptions: {sync_seconds:.1f} s wall, "
        f"control plane CPU {cpu1 - cpu0:.1f} s, RSS {rss1} MiB (peak during sync {sync_peak} MiB)"
    )

    starts = []

    async def changes() -> None:
        endpoint = ControlPlaneEndpoint(target, root_pem)
        async with ControlPlaneClient(endpoint, "node-0", token(0)) as client:
            for i in range(args.changes):
                starts.append(time.time())
                await client.register_workload(
                    namespace="bench", name="w-0", uid=f"uid-{i}", ips=[f"10.200.0.{i + 1}"]
                )
                await asyncio.sleep(1.5)

    t1 = time.monotonic()
    asyncio.run(changes())
    # Let the last change land everywhere before reading the arrivals.
    time.sleep(min(args.change_timeout, 5.0))
    cpu2, rss2, _ = cpu_and_memory(plane.pid)
    steady_peak = sampler.peak_since(t1)
    for pipe in pipes:
        pipe.send("report")
    arrivals: dict[int, list[float]] = {}
    for pipe in pipes:
        if not pipe.poll(args.change_timeout):
            print("a client process did not report its arrivals", file=sys.stderr)
            return 1
        arrivals.update(pipe.recv())

    per_change = []
    for i, start in enumerate(starts):
        latencies = sorted(a[i] - start for a in arrivals.values() if len(a) > i)
        if len(latencies) != args.nodes:
            print(f"change {i}: only {len(latencies)} of {args.nodes} subscribers got it")
            return 1
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        per_change.append((p50, p99, latencies[-1]))
        print(
            f"change {i}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"all {latencies[-1] * 1000:.1f} ms"
        )
    print(
        f"median over changes: p50 {statistics.median(c[0] for c in per_change) * 1000:.1f} ms, "
        f"p99 {statistics.median(c[1] for c in per_change) * 1000:.1f} ms, "
        f"all reached {statistics.median(c[2] for c in per_change) * 1000:.1f} ms"
    )
    print(
        f"control plane CPU for {args.changes} changes: {cpu2 - cpu1:.2f} s "
        f"({(cpu2 - cpu1) / args.changes * 1000:.0f} ms per change incl. ACK handling); "
        f"steady RSS {rss2} MiB (peak while changing {steady_peak} MiB), "
        f"peak overall {sampler.peak_since(0)} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
