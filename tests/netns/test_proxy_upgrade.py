"""A proxy upgrade under load loses nothing; a proxy that dies is started again.

client (node-1) -> server (node-2) through both node proxies over HBONE, at
200 new connections per second plus 20 long-lived echo connections that end
while the old proxy drains. Each node's proxy is upgraded the way a
DaemonSet rolls with maxSurge: the successor starts beside it, and the old
one is told to stop once the successor reached the agent. No new connection
may fail and no long-lived one may be reset. All of it with one proxy
process per node, then with two workers per node proxy (`--workers 2`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from node_agent.localmesh.mesh import (
    REPO,
    LocalMesh,
    MeshNode,
    Process,
    http_get,
    real_proxy,
    spawn,
)
from node_agent.localmesh.topology import Pod
from testbed.traffic_load import wait_serving

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

CONFIG = REPO / "examples" / "mesh.yaml"
PORT = 8080
RATE = 200.0
SECONDS = 14.0
UPGRADE_AT_S = 3.0
DRAIN_S = 5.0
# While the old proxy drains: it is told to stop no sooner than UPGRADE_AT_S
# (once its successor reached the agent), so all end within its drain deadline.
LONG_LIVED_ENDS = [5.0 + 2.5 * i / 19 for i in range(20)]


@dataclass
class Mesh:
    local: LocalMesh
    client: Pod
    server: Pod


@pytest.fixture(scope="module", params=[1, 2], ids=["one-worker", "two-workers"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    with LocalMesh(
        CONFIG, real_proxy, proxy_drain_seconds=DRAIN_S, proxy_workers=request.param
    ) as local:
        local.add_node("node-1", "10.244.1.0/24")
        local.add_node("node-2", "10.244.2.0/24")
        client = local.add_pod("node-1", "client")
        server = local.add_pod("node-2", "server")
        echo = spawn(
            server.netns, "echo", [*_load_command(), "serve", "--port", str(PORT)], local.work
        )
        try:
            wait_serving(server.netns, PORT)
            yield Mesh(local, client, server)
        finally:
            echo.stop()


def _load_command() -> list[str]:
    return [sys.executable, "-m", "testbed.traffic_load"]


def _drive(mesh: Mesh, name: str) -> Process:
    ends = [arg for end in LONG_LIVED_ENDS for arg in ("--long-lived-end", f"{end:.2f}")]
    return spawn(
        mesh.client.netns,
        name,
        [
            *_load_command(),
            "drive",
            "--target",
            f"{mesh.server.ipv4}:{PORT}",
            "--rate",
            str(RATE),
            "--seconds",
            str(SECONDS),
            *ends,
        ],
        mesh.local.work,
    )


def _report(load: Process) -> dict[str, Any]:
    assert load.popen.wait(SECONDS + 30) == 0, load.tail()
    last = load.log.read_text().strip().splitlines()[-1]
    report: dict[str, Any] = json.loads(last)
    return report


def _mtls_opened(node: MeshNode) -> float:
    status, body = http_get(node.node.netns, "127.0.0.1", 15020, "/metrics")
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'connection_security_policy="mutual_tls"' in line
    )


@pytest.mark.parametrize(
    "upgraded", ["node-1", "node-2"], ids=["source-proxy", "destination-proxy"]
)
def test_a_proxy_upgrade_under_load_fails_no_connection(mesh: Mesh, upgraded: str) -> None:
    node = mesh.local.nodes[upgraded]
    keeper = node.proxy_keeper
    assert keeper is not None
    load = _drive(mesh, f"load-{upgraded}")
    time.sleep(UPGRADE_AT_S)
    old = node.proxy
    assert old is not None
    new = mesh.local.upgrade_proxy(upgraded)
    assert keeper.wait_retired(DRAIN_S + 20)[-1] == 0, old.tail()
    report = _report(load)

    print(f"upgrade of {upgraded}'s proxy under load: {json.dumps(report)}")
    # Shown only if an assertion fails: what the proxies said besides successes.
    for name, each in (*((n, m.proxy) for n, m in mesh.local.nodes.items()), ("old", old)):
        if each is not None:
            unusual = [
                line
                for line in each.log.read_text(errors="replace").splitlines()
                if '"outcome":"ok"' not in line
            ]
            print(f"--- {name} proxy log, less successes\n" + "\n".join(unusual[-40:]))
    assert report["new_attempted"] == int(RATE * SECONDS)
    assert report["new_failed"] == 0, report["new_failures"]
    assert report["long_lived_reset"] == 0, report["long_lived_resets"]
    # Every long-lived connection echoed all along (about 10 times a second).
    assert report["long_lived_echoes"] >= len(LONG_LIVED_ENDS) * 5.0 * 8
    handover = [line for line in old.log.read_text().splitlines() if "handover:" in line]
    assert handover and "a successor proxy holds every pod" in handover[-1], old.tail()
    # Traffic after the upgrade went through the successor, with mTLS.
    assert new.popen.poll() is None
    assert _mtls_opened(node) > 0


def test_a_proxy_that_dies_is_started_again_and_serves(mesh: Mesh) -> None:
    node = mesh.local.nodes["node-2"]
    keeper = node.proxy_keeper
    assert keeper is not None
    restarts = keeper.restarts
    victim = keeper.kill()
    deadline = time.monotonic() + 30
    while node.proxy is victim or _mtls_ready(node) is False:
        assert time.monotonic() < deadline, f"proxy not back:\n{victim.tail()}"
        time.sleep(0.1)
    assert keeper.restarts == restarts + 1
    load = _drive_briefly(mesh)
    report = _report(load)
    assert report["new_failed"] == 0, report["new_failures"]


def _mtls_ready(node: MeshNode) -> bool:
    try:
        status, _ = http_get(node.node.netns, "127.0.0.1", 15020, "/healthz/ready")
    except OSError:
        return False
    return status == 200


def _drive_briefly(mesh: Mesh) -> Process:
    return spawn(
        mesh.client.netns,
        "load-after-restart",
        [
            *_load_command(),
            "drive",
            "--target",
            f"{mesh.server.ipv4}:{PORT}",
            "--rate",
            "50",
            "--seconds",
            "2",
        ],
        mesh.local.work,
    )
