"""Control plane push benchmark (run by hand, not a test).

    .venv/bin/python bench/controlplane_push.py [--nodes 1000] [--workloads 10000]

Starts `weir controlplane` (controlplane.cli.main) in its own process on a
generated mesh, opens one delta ADS subscription (Workload type, wildcard) per
node from several client processes, waits for every initial sync, then
changes one workload several times through the registration API (as its
node) and reports, per change, how long it took to reach every subscriber
(p50/p99/max over subscribers), plus the control plane's CPU time and memory.
"""

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from controlplane import xds_transport
from controlplane.client import auth_metadata, register_workload
from controlplane.mesh import WORKLOAD_TYPE

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


# -- client processes -----------------------------------------------------------


def client_process(target: str, nodes: list[int], conn, channels: int) -> None:
    asyncio.run(_client_main(target, nodes, conn, channels))


async def _client_main(target, nodes, conn, channels) -> None:
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    arrivals: dict[int, list[float]] = {n: [] for n in nodes}
    synced = 0
    all_synced = asyncio.Event()

    async def subscribe(index: int, node: int) -> None:
        nonlocal synced
        method = chans[index % channels].stream_stream(
            xds_transport.DELTA_METHOD,
            request_serializer=xds_transport.passthrough,
            response_deserializer=xds_transport.decode_response,
        )
        call = method(None, metadata=auth_metadata(token(node)))
        await call.write(
            xds_transport.encode_request(node_id=f"node-{node}", type_url=WORKLOAD_TYPE)
        )
        first = True
        async for response in call:
            now = time.time()
            if first:
                first = False
                synced += 1
                if synced == len(nodes):
                    all_synced.set()
            elif any(r.name == CHANGED for r in response.resources):
                arrivals[node].append(now)
            await call.write(
                xds_transport.encode_request(
                    node_id=f"node-{node}",
                    type_url=WORKLOAD_TYPE,
                    response_nonce=response.nonce,
                )
            )

    async def subscribe_reporting(index: int, node: int) -> None:
        try:
            await subscribe(index, node)
        except grpc.aio.AioRpcError as exc:
            print(f"node-{node}: {exc.code().name} {exc.details()}", file=sys.stderr)
            raise

    tasks = [asyncio.create_task(subscribe_reporting(i, n)) for i, n in enumerate(nodes)]
    await asyncio.wait_for(all_synced.wait(), timeout=600)
    conn.send("synced")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, conn.recv)  # "report"
    conn.send(arrivals)
    for task in tasks:
        task.cancel()
    for chan in chans:
        await chan.close()


# -- the run ---------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--workloads", type=int, default=10000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--changes", type=int, default=10)
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
        return run(args, plane, target, http_port)
    finally:
        plane.send_signal(signal.SIGTERM)
        plane.wait(timeout=30)


def run(args, plane, target, http_port) -> int:
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
    cpu0, rss0, _ = cpu_and_memory(plane.pid)
    print(f"control plane ready: {args.workloads} workloads, {args.nodes} nodes; RSS {rss0} MiB")

    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    t0 = time.monotonic()
    for p in range(args.processes):
        parent, child = ctx.Pipe()
        nodes = list(range(p, args.nodes, args.processes))
        proc = ctx.Process(target=client_process, args=(target, nodes, child, 10))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        if not pipe.poll(600):
            print("initial sync timed out", file=sys.stderr)
            return 1
        assert pipe.recv() == "synced"
    sync_seconds = time.monotonic() - t0
    cpu1, rss1, _ = cpu_and_memory(plane.pid)
    print(
        f"initial sync of {args.nodes} subscriptions: {sync_seconds:.1f} s wall, "
        f"control plane CPU {cpu1 - cpu0:.1f} s, RSS {rss1} MiB"
    )

    starts = []

    async def changes() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            for i in range(args.changes):
                starts.append(time.time())
                await register_workload(
                    channel,
                    token(0),
                    namespace="bench",
                    name="w-0",
                    uid=f"uid-{i}",
                    ips=[f"10.200.0.{i + 1}"],
                )
                await asyncio.sleep(1.5)

    asyncio.run(changes())
    cpu2, rss2, peak = cpu_and_memory(plane.pid)
    for pipe in pipes:
        pipe.send("report")
    arrivals: dict[int, list[float]] = {}
    for pipe in pipes:
        arrivals.update(pipe.recv())
    for proc in procs:
        proc.join(timeout=30)

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
        f"RSS {rss2} MiB, peak {peak} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
