"""Capture mode benchmark: no capture vs iptables vs eBPF (run by hand, as root, not a test).

    .venv/bin/python bench/capture_modes.py [--repeats 5] [--connects 300] [--seconds 1]

Builds a throwaway node with two pods (client and server) from the local
topology harness, and, for each mode, measures from inside the client pod:

- connect latency: connect() plus one request/response on the new
  connection, p50 and p99 over --connects connections;
- new-connection rate: connect, one request/response, close, for --seconds;
- request rate on one connection: request/response round trips for --seconds.

"none" connects straight to the server. "iptables" and "ebpf" capture the
client pod, and a minimal stand-in proxy on 15001 (asyncio, its upstream
sockets carrying the proxy mark) recovers the original destination with
SO_ORIGINAL_DST and relays to it: what differs between the two is only how
the connection is steered. Client, relay and echo server are separate
processes, so none shares a GIL with another. Each mode runs --repeats times,
interleaved (none, iptables, ebpf, none, ...) so drift hits all alike; the
table shows medians and the ratio to "none" from the same run. Everything
is bounded: a repeat that takes longer than its budget is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator

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

SERVER_PORT = 8080
MODES = ("none", "iptables", "ebpf")

# The measuring client: standard library only, run with the system python.
CLIENT = r"""
import json, socket, sys, time
host, port, connects, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

def one():
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    return s

latencies = []
for _ in range(connects):
    t = time.perf_counter()
    s = one()
    latencies.append(time.perf_counter() - t)
    s.close()
latencies.sort()

end, new = time.perf_counter() + seconds, 0
while time.perf_counter() < end:
    one().close()
    new += 1

s, end, reqs = one(), time.perf_counter() + seconds, 0
while time.perf_counter() < end:
    s.sendall(b"x")
    s.recv(1)
    reqs += 1
s.close()
print(json.dumps({
    "p50_us": latencies[len(latencies) // 2] * 1e6,
    "p99_us": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6,
    "new_conn_per_s": new / seconds,
    "req_per_s": reqs / seconds,
}))
"""


# The echo server (in the server pod) and the stand-in proxy (in the client
# pod): asyncio, one process each, standard library only.
ECHO = r"""
import asyncio, socket, sys

async def echo(reader, writer):
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := await reader.read(64):
        writer.write(data)
    writer.close()

async def main():
    server = await asyncio.start_server(echo, "0.0.0.0", int(sys.argv[1]), backlog=512)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""
RELAY = r"""
import asyncio, socket, struct, sys
mark = int(sys.argv[2])

async def relay(reader, writer):
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port, addr = struct.unpack_from("!2xH4s", sock.getsockopt(socket.SOL_IP, 80, 16))
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up.setblocking(False)
    await asyncio.get_running_loop().sock_connect(up, (socket.inet_ntoa(addr), port))
    up_reader, up_writer = await asyncio.open_connection(sock=up)
    while data := await reader.read(64):
        up_writer.write(data)
        writer.write(await up_reader.read(64))
    up_writer.close()
    writer.close()

async def main():
    server = await asyncio.start_server(relay, "0.0.0.0", int(sys.argv[1]), backlog=512)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@contextlib.contextmanager
def background(pod: Pod, script: str, *args: str) -> Iterator[None]:
    """Run `script` inside `pod` until the block ends; it prints "ready" once it listens."""
    python = os.path.realpath(sys.executable)
    with netns_mod.entered(pod.netns):
        proc = subprocess.Popen(
            [python, "-I", "-S", "-c", script, *args], stdout=subprocess.PIPE, text=True
        )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"helper in {pod.name} did not start")
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def capture(mode: str, pod: Pod, pins: PinLayout) -> Iterator[None]:
    if mode == "none":
        yield
        return
    engine: CaptureMode = IptablesCapture(Backend.NFT) if mode == "iptables" else EbpfCapture(pins)
    engine.apply(pod.netns, CaptureConfig())
    try:
        yield
    finally:
        engine.remove(pod.netns)
        if isinstance(engine, EbpfCapture):
            engine.close()


def measure(client: Pod, server_ip: str, connects: int, seconds: float) -> dict[str, float]:
    python = os.path.realpath(sys.executable)
    argv = [
        python,
        "-I",
        "-S",
        "-c",
        CLIENT,
        server_ip,
        str(SERVER_PORT),
        str(connects),
        str(seconds),
    ]
    budget = 30 + connects * 0.05 + 3 * seconds
    proc = netns_mod.run(client.netns, argv, timeout=budget)
    if proc.returncode != 0:
        raise SystemExit(f"client failed: {proc.stderr.strip()}")
    return dict(json.loads(proc.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    if not (1 <= args.repeats <= 20 and 10 <= args.connects <= 5000 and 0.2 <= args.seconds <= 10):
        parser.error("keep it bounded: repeats 1-20, connects 10-5000, seconds 0.2-10")

    pins = PinLayout(BPFFS / f"weirbench-{uuid.uuid4().hex[:8]}")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    try:
        with LocalTopology() as topo:
            node = topo.add_node("node-1", "10.244.1.0/24")
            client, server = topo.add_pod(node, "client"), topo.add_pod(node, "server")
            # Compile and attach once, outside the timed runs; apply/remove per repeat is cheap.
            loader.install(pins)
            with (
                background(server, ECHO, str(SERVER_PORT)),
                background(client, RELAY, str(OUTBOUND_CAPTURE_PORT), str(PROXY_MARK)),
            ):
                for repeat in range(args.repeats):
                    for mode in MODES:
                        with capture(mode, client, pins):
                            r = measure(client, str(server.ipv4), args.connects, args.seconds)
                        results[mode].append(r)
                        print(f"repeat {repeat + 1} {mode:8} {json.dumps(r)}", file=sys.stderr)
    finally:
        loader.uninstall(pins)

    medians = {
        m: {k: statistics.median(r[k] for r in results[m]) for k in results[m][0]} for m in MODES
    }
    print(f"medians of {args.repeats} repeats, {args.connects} connects, {args.seconds:g} s rates")
    print(
        f"{'mode':9} {'p50 us':>9} {'p99 us':>9} {'new conn/s':>11} {'req/s':>9}   ratios vs none"
    )
    base = medians["none"]
    for m in MODES:
        v = medians[m]
        ratios = " ".join(
            f"{k.split('_')[0]}x{v[k] / base[k]:.2f}"
            for k in ("p50_us", "p99_us", "new_conn_per_s", "req_per_s")
        )
        print(
            f"{m:9} {v['p50_us']:9.0f} {v['p99_us']:9.0f} {v['new_conn_per_s']:11.0f} "
            f"{v['req_per_s']:9.0f}   {ratios}"
        )
    ipt, ebpf = medians["iptables"], medians["ebpf"]
    print(
        f"ebpf vs iptables: p50 x{ebpf['p50_us'] / ipt['p50_us']:.2f}, "
        f"new conn/s x{ebpf['new_conn_per_s'] / ipt['new_conn_per_s']:.2f}, "
        f"req/s x{ebpf['req_per_s'] / ipt['req_per_s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
