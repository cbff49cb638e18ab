"""`weir proxy run` end to end: a real control plane (TLS, delta xDS, CA), two proxy
processes dropped to UID 1337, pods served by hand, A reaching B through both; and
the same with two worker processes per proxy, which share the listeners and are
seen (metrics, readiness, connections) through the first one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import ControlPlaneClient
from node_agent.localmesh.topology import LocalTopology, Pod
from node_agent.netns import entered
from node_agent.node_cli.verify import running_proxy
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.iptables import IptablesCapture
from testbed.proxy_lab import EchoServer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

APP_PORT = 8080
TOKENS = {"node-1": "token-node-1-0123456789", "node-2": "token-node-2-0123456789"}
MESH = """
trustDomain: cluster.local
nodes:
  - {name: node-1, bootstrapToken: token-node-1-0123456789}
  - {name: node-2, bootstrapToken: token-node-2-0123456789}
workloads:
  - {name: a, namespace: default, serviceAccount: a, node: node-1, labels: {app: a}}
  - {name: b, namespace: default, serviceAccount: b, node: node-2, labels: {app: b}}
"""
CONTROL_PLANE = "import sys; from controlplane.cli import main; sys.exit(main(sys.argv[1:]))"
# What `weir proxy ...` runs once weir_cli/__init__.py registers the subcommand.
PROXY = """
import argparse, logging, sys
from node_agent.proxy import cli
parser = argparse.ArgumentParser()
cli.register(parser.add_subparsers(dest="command", required=True))
logging.basicConfig(level=logging.INFO)
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def http_get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return reply.read().decode()
    except OSError:
        return None


@contextlib.contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def control_plane(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A control plane on MESH, serving: its gRPC port and the root to trust."""
    (tmp_path / "mesh.yaml").write_text(MESH)
    grpc_port, http_port = free_port(), free_port()
    root = tmp_path / "state" / "root-cert.pem"
    with process(
        [
            sys.executable, "-c", CONTROL_PLANE,
            "--config", str(tmp_path / "mesh.yaml"),
            "--listen", f"127.0.0.1:{grpc_port}",
            "--http-listen", f"127.0.0.1:{http_port}",
            "--state-dir", str(tmp_path / "state"),
        ],
        tmp_path / "controlplane.log",
    ):  # fmt: skip
        # Ready means serving: the root file alone is written before the listener opens.
        wait_until(
            lambda: http_get(http_port, "/healthz/ready") is not None and root.exists(),
            "the control plane to be ready",
        )
        yield grpc_port, root


async def register(endpoint: ControlPlaneEndpoint, pods: list[Pod]) -> None:
    for pod in pods:
        async with ControlPlaneClient(endpoint, pod.node.name, TOKENS[pod.node.name]) as client:
            await client.register_workload(
                namespace=pod.namespace, name=pod.name, uid=pod.uid, ips=[str(pod.ipv4)]
            )


def echo(pod: Pod, dst: Pod) -> bytes:
    with entered(pod.netns):
        sock = socket.socket()
    with sock:
        sock.settimeout(5)
        sock.connect((str(dst.ipv4), APP_PORT))
        sock.sendall(b"through weir proxy run")
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(64)


def admin_section(port: int, name: str):
    body = http_get(port, f"/config_dump?section={name}")
    assert body is not None, f"no answer from the admin port for {name}"
    return json.loads(body)[name]


def listeners(pod: Pod, port: int) -> int:
    """Listening sockets on `port` in the pod's netns (a worker's each)."""
    out = subprocess.run(
        ["ip", "netns", "exec", pod.netns_name, "ss", "-Hltn", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


def opened(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
    )


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_weir_proxy_run_end_to_end(tmp_path, workers):
    capture = IptablesCapture(Backend.NFT)
    with control_plane(tmp_path) as (grpc_port, root), LocalTopology() as topo:
        node1 = topo.add_node("node-1", "10.244.1.0/24")
        node2 = topo.add_node("node-2", "10.244.2.0/24")
        a, b = topo.add_pod(node1, "a"), topo.add_pod(node2, "b")
        server = EchoServer(b, APP_PORT)
        try:
            for pod in (a, b):
                capture.apply(pod.netns, CaptureConfig())
            endpoint = ControlPlaneEndpoint.tls(f"127.0.0.1:{grpc_port}", root)
            asyncio.run(register(endpoint, [a, b]))
            metrics = {"node-1": free_port(), "node-2": free_port()}
            readiness = {"node-1": free_port(), "node-2": free_port()}
            admin = {"node-1": free_port(), "node-2": free_port()}
            token_files = {}
            for node, token in TOKENS.items():
                token_files[node] = tmp_path / f"{node}.token"
                token_files[node].write_text(token)
            with contextlib.ExitStack() as stack:
                proxies = {
                    pod.node.name: stack.enter_context(
                        process(
                            [
                                sys.executable, "-c", PROXY, "proxy", "run",
                                "--control-plane", f"127.0.0.1:{grpc_port}",
                                "--control-plane-roots", str(root),
                                "--node", pod.node.name,
                                "--token-file", str(token_files[pod.node.name]),
                                "--pod", f"default/{pod.name}={pod.netns.path}",
                                "--drop-to-uid", "1337",
                                "--metrics-listen", f"127.0.0.1:{metrics[pod.node.name]}",
                                "--readiness-listen", f"127.0.0.1:{readiness[pod.node.name]}",
                                "--admin-listen", f"127.0.0.1:{admin[pod.node.name]}",
                                "--workers", str(workers),
                            ],
                            tmp_path / f"proxy-{pod.node.name}.log",
                        )
                    )
                    for pod in (a, b)
                }  # fmt: skip
                for node, port in readiness.items():
                    wait_until(
                        lambda p=port: http_get(p, "/healthz/ready") == "ready\n",
                        f"{node}'s proxy to be ready",
                    )
                    status = Path(f"/proc/{proxies[node].pid}/status").read_text()
                    assert "Uid:\t1337\t1337\t1337\t1337" in status
                    assert "CapAmb:\t0000000000201000" in status

                def pod_served() -> bool:
                    with contextlib.suppress(OSError):
                        return echo(a, b) == b"through weir proxy run"
                    return False

                wait_until(pod_served, "a to reach b through both proxies")
                text = http_get(metrics["node-2"], "/metrics") or ""
                assert 'source_principal="spiffe://cluster.local/ns/default/sa/a"' in text
                assert 'connection_security_policy="mutual_tls"' in text
                assert listeners(b, 15006) == workers and listeners(a, 15001) == workers
                others = []
                if workers > 1:
                    check_workers(a, b, admin["node-1"], metrics["node-1"], workers)
                    for port in admin.values():
                        others += [row["pid"] for row in admin_section(port, "workers")[1:]]
                for proc in proxies.values():
                    proc.send_signal(signal.SIGTERM)
                for proc in proxies.values():
                    assert proc.wait(timeout=15) == 0
                # The other workers drained and exited with the first.
                assert not [pid for pid in others if Path(f"/proc/{pid}").exists()]
        finally:
            server.close()
            for pod in (a, b):
                with contextlib.suppress(Exception):
                    capture.remove(pod.netns)


def check_workers(a: Pod, b: Pod, admin: int, metrics: int, workers: int) -> None:
    """Every worker of a's proxy serves; what the first one shows counts them all in.

    On a's side, where the app's connections are accepted, the kernel spreads
    them over the workers. (b's proxy takes them as streams of the pooled
    HBONE connections, each accepted by one of its workers.)"""
    table = admin_section(admin, "workers")
    assert [row["worker"] for row in table] == list(range(workers))
    # /logs (what `weir node logs` reads) has every worker's records, each saying whose.
    body = http_get(admin, "/logs?lines=1000")
    assert body is not None
    serving = [r for r in json.loads(body)["records"] if r["message"].startswith("serving pod")]
    assert sorted(r["worker"] for r in serving) == list(range(workers))
    # `weir node verify` takes every worker for the proxy, not for a stray UID 1337 process.
    _, proxy_pids = running_proxy(admin)
    assert proxy_pids == {row["pid"] for row in table}
    for row in table[1:]:
        assert "Uid:\t1337\t1337\t1337\t1337" in Path(f"/proc/{row['pid']}/status").read_text()
    before = opened(http_get(metrics, "/metrics") or "")
    for _ in range(40):
        assert echo(a, b) == b"through weir proxy run"
    # Every worker's, asked for as /metrics is served.
    assert opened(http_get(metrics, "/metrics") or "") == before + 40
    spread = [row["connections_opened"] for row in admin_section(admin, "workers")]
    assert all(count > 0 for count in spread), f"a worker took no connection: {spread}"
    # Open connections of every worker show in `connections`.
    with contextlib.ExitStack() as held:
        for _ in range(12):
            with entered(a.netns):
                sock = held.enter_context(socket.socket())
            sock.settimeout(5)
            sock.connect((str(b.ipv4), APP_PORT))
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        live = admin_section(admin, "connections")
        assert sum(c["direction"] == "outbound" for c in live) == 12


def test_a_worker_that_dies_stops_the_proxy(tmp_path):
    """The group lives and dies together: the kubelet restarts the container."""
    with control_plane(tmp_path) as (grpc_port, root):
        token = tmp_path / "node-1.token"
        token.write_text(TOKENS["node-1"])
        readiness, admin = free_port(), free_port()
        log = tmp_path / "proxy.log"
        with process(
            [
                sys.executable, "-c", PROXY, "proxy", "run",
                "--control-plane", f"127.0.0.1:{grpc_port}",
                "--control-plane-roots", str(root),
                "--node", "node-1",
                "--token-file", str(token),
                "--drop-to-uid", "1337",
                "--metrics-listen", f"127.0.0.1:{free_port()}",
                "--readiness-listen", f"127.0.0.1:{readiness}",
                "--admin-listen", f"127.0.0.1:{admin}",
                "--workers", "3",
            ],
            log,
        ) as proxy:  # fmt: skip
            wait_until(
                lambda: http_get(readiness, "/healthz/ready") == "ready\n",
                "all three workers to be ready",
            )
            pids = [row["pid"] for row in admin_section(admin, "workers")]
            assert len(set(pids)) == 3 and pids[0] == proxy.pid
            os.kill(pids[2], signal.SIGKILL)
            assert proxy.wait(timeout=20) != 0
            text = log.read_text()
            assert re.search(rf"worker 2 \(pid {pids[2]}\) exited \(killed by SIGKILL\)", text)
            # The other follower was stopped too, not left behind.
            wait_until(lambda: not Path(f"/proc/{pids[1]}").exists(), "worker 1 to exit")
