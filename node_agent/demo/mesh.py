"""`weir demo`: two nodes, four pods, real agents and proxies, every pair tried.

The control plane reads examples/mesh.yaml; each node runs `weir agent` and
`weir proxy run` (as UID 1337) in its own network namespace; pods are created
by running the node's CNI chain (bridge, host-local, weir-cni) as a container
runtime would. Every pod runs a small server, then every pod connects to
every other one. The table shows what happened and what the destination's
proxy reported (identities from verified certificates); a capture of the
underlay between the nodes shows that no payload crossed in clear. Held, the
mesh then stays up for `weir node ...` until SIGINT or SIGTERM.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from node_agent import netns as netns_mod
from node_agent.constants import PROXY_UID
from node_agent.localmesh.mesh import REPO, LocalMesh, Process, real_proxy
from node_agent.localmesh.topology import Pod
from node_agent.localmesh.traffic import TrafficObserver, connect

CONFIG = REPO / "examples" / "mesh.yaml"
NODES = (("node-1", "10.244.1.0/24"), ("node-2", "10.244.2.0/24"))
_LOG_WAIT_S = 3.0
# How long a held demo may take to notice the signal that ends it.
_HOLD_POLL_S = 0.2


@dataclass(frozen=True)
class DemoPod:
    namespace: str
    name: str
    node: str
    port: int

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


PODS = (
    DemoPod("default", "client", "node-1", 8080),
    DemoPod("legacy", "intruder", "node-1", 8080),
    DemoPod("default", "server", "node-2", 8080),
    DemoPod("default", "db", "node-2", 5432),
)


@dataclass(frozen=True)
class Result:
    source: str
    destination: str
    allowed: bool
    security: str
    identities: str
    reason: str


def access_log(process: Process) -> list[dict[str, Any]]:
    """The proxy's JSON access log lines (the rest of its output is logging)."""
    entries = []
    for line in process.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "reporter" in entry:
                entries.append(entry)
    return entries


def wait_for_access_log(
    process: Process,
    wanted: Callable[[dict[str, Any]], bool],
    *,
    skip: int = 0,
    timeout_s: float = _LOG_WAIT_S,
) -> list[dict[str, Any]]:
    """The access log entries after the first `skip` that `wanted` picks, once there is one.

    A proxy logs a connection once it ended, and writes its lines in batches
    (every 0.2 s), so a caller that just saw a connection end polls; an empty
    list means none came within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        entries = [entry for entry in access_log(process)[skip:] if wanted(entry)]
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def _destination_entry(proxy: Process, skip: int, dst: DemoPod) -> dict[str, Any] | None:
    """The inbound proxy's record of the connection just made."""
    entries = wait_for_access_log(
        proxy,
        lambda entry: (
            entry.get("reporter") == "destination"
            and entry.get("dst", {}).get("workload") in (dst.key, dst.name)
        ),
        skip=skip,
    )
    return entries[0] if entries else None


@contextlib.contextmanager
def underlay_capture(mesh: LocalMesh) -> Iterator[Path]:
    """tcpdump every TCP packet crossing the underlay (between the nodes)."""
    pcap = mesh.work / "underlay.pcap"
    with netns_mod.entered(mesh.topology.underlay):
        dump = subprocess.Popen(
            ["tcpdump", "-i", "any", "-U", "-s", "0", "-w", str(pcap), "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 5
        while not pcap.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield pcap
    finally:
        time.sleep(0.3)
        dump.terminate()
        dump.wait(5)


def try_every_pair(
    mesh: LocalMesh, apps: TrafficObserver, pods: list[tuple[DemoPod, Pod]]
) -> tuple[list[Result], list[str]]:
    """Connect every pod to every other; (what happened, the payload each one sent)."""
    results, payloads = [], []
    for (src_spec, src), (dst_spec, dst) in itertools.permutations(pods, 2):
        proxy = mesh.nodes[dst_spec.node].proxy
        if proxy is None:
            raise RuntimeError(f"{dst_spec.node} has no proxy")
        skip = len(access_log(proxy))
        attempt = connect(src.netns, str(dst.ipv4), dst_spec.port, timeout=5)
        payloads.append(attempt.token)
        allowed = apps.wait_for(attempt.token, timeout=5) is not None
        entry = _destination_entry(proxy, skip, dst_spec)
        identities = "(no record)"
        if entry is not None:
            identities = (
                f"{entry['src'].get('identity') or '(none)'} -> {entry['dst'].get('identity')}"
            )
        results.append(
            Result(
                source=src_spec.key,
                destination=f"{dst_spec.key}:{dst_spec.port}",
                allowed=allowed,
                security=str(entry.get("security_policy", "-")) if entry else "-",
                identities=identities,
                reason=str(entry.get("reason") or "") if entry else "",
            )
        )
    return results, payloads


def print_table(results: list[Result]) -> None:
    rows = [("source", "destination", "verdict", "security", "identities (destination proxy)")]
    rows += [
        (
            r.source,
            r.destination,
            "allowed" if r.allowed else f"denied{f' ({r.reason})' if r.reason else ''}",
            r.security,
            r.identities,
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def wire_check(pcap: Path, payloads: list[str]) -> tuple[int, list[str]]:
    """(packets between the nodes, payloads that appeared in clear among them)."""
    raw = pcap.read_bytes()
    listed = subprocess.run(
        ["tcpdump", "-r", str(pcap), "-nn", "-q"], capture_output=True, text=True, check=False
    )
    packets = len(listed.stdout.splitlines())
    return packets, [p for p in payloads if p.encode() in raw]


def explore_lines(mesh: LocalMesh) -> list[str]:
    """One `weir node status` command per node, run in the node's real netns.

    Other checks parse these lines: keep their form exactly."""
    return [
        f"node {name}: ip netns exec {mesh.nodes[name].node.netns_name} weir node status"
        for name, _ in NODES
    ]


def hold(mesh: LocalMesh) -> None:
    """Keep the mesh up, saying how to explore and stop it, until SIGINT or SIGTERM."""
    stopped: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopped.append(signum)

    # Both signals are the expected way out of a hold, not an interruption:
    # the demo then cleans up and reports as it does unheld.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print()
        for line in explore_lines(mesh):
            print(line)
        if os.environ.get("WEIR_REDIRECT_MODE") == "ebpf":
            # ip netns exec remounts /sys, so the agent's eBPF pins are out of sight there.
            print("eBPF mode: ip netns exec hides the pins; to check capture, instead:")
            for name, _ in NODES:
                node = mesh.nodes[name]
                print(
                    f"  nsenter --net={node.node.netns.path} weir node status"
                    f" --bpf-pin-root {node.pins.root}"
                )
        print(f"holding the mesh: Ctrl-C or kill -TERM {os.getpid()} removes it", flush=True)
        while not stopped:
            time.sleep(_HOLD_POLL_S)
        print(f"\n{signal.Signals(stopped[0]).name}: removing the mesh", flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(*, hold_mesh: bool = False) -> int:
    started = time.monotonic()
    with LocalMesh(CONFIG, real_proxy) as mesh, TrafficObserver() as apps:
        print(f"control plane: {mesh.controlplane_address} (gRPC over TLS, its own CA)")
        for name, cidr in NODES:
            mesh.add_node(name, cidr)
            print(f"{name}: weir agent and weir proxy (uid {PROXY_UID}) ready; pods in {cidr}")
        pods = []
        for spec in PODS:
            pod = mesh.add_pod(spec.node, spec.name, spec.namespace)
            apps.listen(pod.netns, spec.key, spec.port, ipv6=False)
            pods.append((spec, pod))
            print(f"pod {spec.key} on {spec.node}: {pod.ipv4}, enrolled by the CNI chain")
        print()
        with underlay_capture(mesh) as pcap:
            results, payloads = try_every_pair(mesh, apps, pods)
        print_table(results)
        packets, in_clear = wire_check(pcap, payloads)
        print(
            f"\nbetween the nodes: {packets} TCP packets captured on the underlay; "
            f"{len(in_clear)} of {len(payloads)} payloads seen in clear"
        )
        if hold_mesh:
            hold(mesh)
    print(f"removed every namespace, link, rule and process; {time.monotonic() - started:.1f}s")
    ok = not in_clear and all(r.security in ("mutual_tls", "-") for r in results)
    print("demo: OK" if ok else "demo: NOT OK")
    return 0 if ok else 1
