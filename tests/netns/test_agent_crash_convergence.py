"""kill -9 of the node agent at random points of a burst of CNI ADDs and DELs.

One node of the real local mesh (control plane, agent, real proxy as UID
1337) and an echo pod on it. Each of the twenty rounds runs ADDs and DELs at
once, every one a real CNI chain (bridge, host-local, frozen weir-cni) from
its own thread, and kills the agent at a seeded random moment of the burst.
A failed ADD is cleaned up as a runtime does (DEL, then the netns goes).
Once the burst drained, the agent is started again; as soon as it is ready:

- every pod whose ADD succeeded is enrolled and served: in the registry as
  captured, held by the proxy, its capture in place, the proxy's listeners
  in its netns, and a connection from it reaches echo with mutual_tls;
- every other pod left nothing: no record, nothing held by the proxy, no
  capture state (no netns, and in eBPF mode no pin or map entry);
- no pod netns on the node is captured without the proxy's listeners.

The seed is printed (WEIR_CRASH_SEED replays a run), and so is each kill time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node_agent.constants import ADMIN_PORT, PROXY_ADMIN_PORT
from node_agent.localmesh.cni_runtime import CNI_ERR_TRY_AGAIN_LATER, CniPluginError
from node_agent.localmesh.mesh import LocalMesh, real_proxy
from node_agent.localmesh.topology import Pod
from node_agent.localmesh.traffic import TrafficObserver
from node_agent.localmesh.wiring import NETNS_DIR
from node_agent.netns import Netns
from node_agent.redirect.podnet import netns_cookie
from tests.netns.agent_state import (
    LISTENER_PORTS,
    NODE,
    admin_json,
    assert_served,
    capture_problems,
    captured,
    ebpf_cookies,
    listening,
    one_node_mesh_config,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

POINTS = 20
NAMES = [f"crash-{i:02d}" for i in range(12)]
# Live pods kept between rounds; each round deletes some and adds the rest of NAMES.
KEEP_AT_MOST = 6
# Kills land anywhere in a burst's measured duration, and a little after its end.
KILL_WITHIN_BURST = 1.1
ECHO_PORT = 8080


@dataclass
class Burst:
    """What one round asked of the runtime and what the runtime saw."""

    added: dict[str, Pod] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def crash_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[LocalMesh, Pod, TrafficObserver]]:
    monkeypatch.setenv("WEIR_REDIRECT_MODE", request.param)
    config = one_node_mesh_config(
        tmp_path / "mesh.yaml", {**dict.fromkeys(NAMES, "crash"), "echo": "echo"}
    )
    with LocalMesh(config, real_proxy) as local, TrafficObserver() as apps:
        local.add_node(NODE, "10.244.1.0/24")
        echo = local.add_pod(NODE, "echo")
        apps.listen(echo.netns, "echo", ECHO_PORT, ipv6=False)
        yield local, echo, apps


def run_burst(
    local: LocalMesh, live: dict[str, Pod], rng: random.Random, kill_after_s: float | None
) -> tuple[Burst, float]:
    """ADD and DEL at once, the agent killed -9 after `kill_after_s`; returns when all ended.

    Also returns when the kill happened, or (no kill) how long the burst took.
    """
    burst = Burst()
    to_delete = rng.sample(sorted(live), k=rng.randint(len(live) // 2, len(live)))
    to_add = [name for name in NAMES if name not in live]

    def add(name: str) -> None:
        try:
            pod = local.add_pod(NODE, name)
        except CniPluginError as e:
            # add_pod already did what a runtime does: DEL, then the netns goes.
            with burst.lock:
                burst.failed[name] = f"{e.code}: {e.msg}"
            # Retryable: the runtime tries again rather than giving the pod up.
            assert e.code == CNI_ERR_TRY_AGAIN_LATER, e
        else:
            with burst.lock:
                burst.added[name] = pod

    def delete(name: str) -> None:
        # weir-cni's DEL never fails; one the dead agent did not get is for it to reconcile.
        local.topology.remove_pod(live[name])
        with burst.lock:
            burst.deleted.append(name)

    jobs: list[Callable[[], None]] = [lambda n=name: add(n) for name in to_add]
    jobs += [lambda n=name: delete(n) for name in to_delete]
    rng.shuffle(jobs)
    agent = local.nodes[NODE].agent
    assert agent is not None
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        started = time.monotonic()
        futures = [pool.submit(job) for job in jobs]
        if kill_after_s is not None:
            time.sleep(kill_after_s)
            agent.kill()
        killed_at = time.monotonic() - started
        for future in futures:
            future.result(timeout=60)
    for name in burst.deleted:
        del live[name]
    live.update(burst.added)
    return burst, killed_at if kill_after_s is not None else time.monotonic() - started


def assert_converged(
    local: LocalMesh, mode: str, live: dict[str, Pod], echo: Pod, burst: Burst, where: str
) -> None:
    """The state right after the restarted agent is ready (see the module docstring)."""
    node = local.nodes[NODE]
    expected = {pod.uid: name for name, pod in live.items()} | {echo.uid: "echo"}
    records = admin_json(node, ADMIN_PORT, "pods")
    assert {r["uid"]: r["name"] for r in records} == expected, where
    assert {r["status"] for r in records} == {"captured"}, (where, records)
    registry = json.loads((node.dir / "state" / "pods.json").read_text())
    assert sorted(p["uid"] for p in registry["pods"] if p["enrolled"]) == sorted(expected), where
    assert len(registry["pods"]) == len(expected), (where, registry)
    held = admin_json(node, PROXY_ADMIN_PORT, "pods")
    assert set(held) == set(expected), (where, held)
    for name in burst.failed:
        # The runtime removed the sandbox after its failed ADD; the name may be live
        # again only if a later ADD of it succeeded, which a burst never has twice.
        assert not (NETNS_DIR / f"{local.topology.prefix}-pod-default-{name}").exists(), where
    # The invariant, over every pod netns on the node: captured => the proxy listens in it.
    for path in sorted(NETNS_DIR.glob(f"{local.topology.prefix}-pod-*")):
        ns = Netns.validate(path)
        if captured(ns, mode, node):
            assert listening(ns) == LISTENER_PORTS, (where, path.name, listening(ns))
    for name, pod in [*live.items(), ("echo", echo)]:
        assert capture_problems(mode, node, pod.netns) == [], (where, name)
        assert listening(pod.netns) == LISTENER_PORTS, (where, name)
    if mode == "ebpf":
        cookies = {netns_cookie(pod.netns) for pod in [*live.values(), echo]}
        assert ebpf_cookies(node) == cookies, where


@pytest.mark.parametrize("crash_mesh", ["iptables", "ebpf"], indirect=True)
def test_agent_killed_at_random_points_of_a_cni_burst_converges(crash_mesh, request):
    local, echo, apps = crash_mesh
    mode = request.node.callspec.params["crash_mesh"]
    seed = int(os.environ.get("WEIR_CRASH_SEED") or random.randrange(2**32))
    print(f"crash convergence ({mode}): WEIR_CRASH_SEED={seed}")
    rng = random.Random(seed)
    live: dict[str, Pod] = {}
    outcomes = {"added": 0, "failed": 0, "deleted": 0}
    started = time.monotonic()
    # How long a burst takes here and now (the machine may be busy): kills land within that.
    calibration, took_s = run_burst(local, live, rng, None)
    assert sorted(calibration.added) == NAMES, calibration.failed
    kill_within_s = took_s * KILL_WITHIN_BURST
    print(f"a burst of {len(NAMES)} ADDs took {took_s:.2f}s; kills within {kill_within_s:.2f}s")
    for point in range(POINTS):
        kill_after_s = rng.uniform(0, kill_within_s)
        burst_started = time.monotonic()
        burst, killed_at = run_burst(local, live, rng, kill_after_s)
        where = f"point {point}: kill at {killed_at:.3f}s (seed {seed})"
        restarted = time.monotonic()
        local.restart_agent(NODE)
        local.wait_agent_ready(NODE)
        ready = time.monotonic()
        assert_converged(local, mode, live, echo, burst, where)
        assert_served(local.nodes[NODE], live, echo, ECHO_PORT, apps)
        # Keep a few for the next round's DELs; the rest go while the agent is healthy.
        extra = [live.pop(name) for name in sorted(live)[KEEP_AT_MOST:]]
        with concurrent.futures.ThreadPoolExecutor(len(extra) or 1) as pool:
            list(pool.map(local.topology.remove_pod, extra))
        print(
            f"{where}: {len(burst.added)} added, {len(burst.failed)} failed, "
            f"{len(burst.deleted)} deleted; burst {restarted - burst_started:.1f}s, "
            f"ready {ready - restarted:.1f}s, checks {time.monotonic() - ready:.1f}s"
        )
        for outcome, count in (
            ("added", len(burst.added)),
            ("failed", len(burst.failed)),
            ("deleted", len(burst.deleted)),
        ):
            outcomes[outcome] += count
    agent = local.nodes[NODE].agent
    assert agent is not None
    log = agent.log.read_text(errors="replace")
    print(
        f"crash convergence ({mode}): {outcomes} in {time.monotonic() - started:.1f}s; "
        f"{log.count('undoing the half-done enrollment')} in-flight ADDs undone at start, "
        f"{log.count('forgetting pod')} pods forgotten"
    )
    # Kills must have landed inside bursts: some ADDs failed, some went through.
    assert outcomes["added"] > 0 and outcomes["failed"] > 0, outcomes
