"""What a node's agent and proxy hold, read from their admin APIs and the kernel.

Shared by the crash and reboot tests, which check the same invariant: a pod
netns with capture state of ours has the proxy's listeners in it.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from node_agent.constants import (
    INBOUND_PLAINTEXT_CAPTURE_PORT,
    INBOUND_TUNNEL_PORT,
    OUTBOUND_CAPTURE_PORT,
)
from node_agent.demo.mesh import access_log
from node_agent.localmesh.mesh import MeshNode, http_get
from node_agent.localmesh.topology import Pod
from node_agent.localmesh.traffic import TrafficObserver, connect
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import FAMILIES, CaptureConfig
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.iptables import IptablesCapture, read_owned
from node_agent.redirect.podnet import TCP_LISTEN, netns_cookie, tcp_sockets

LISTENER_PORTS = {OUTBOUND_CAPTURE_PORT, INBOUND_PLAINTEXT_CAPTURE_PORT, INBOUND_TUNNEL_PORT}
NODE = "node-1"


def one_node_mesh_config(path: Path, accounts: Mapping[str, str]) -> Path:
    """A STRICT one-node mesh whose pods (name -> service account) are labeled app=<account>."""
    workloads = [
        {
            "name": name,
            "namespace": "default",
            "serviceAccount": account,
            "node": NODE,
            "labels": {"app": account},
        }
        for name, account in accounts.items()
    ]
    doc = {
        "trustDomain": "cluster.local",
        "nodes": [{"name": NODE, "bootstrapToken": "test-node-1-token"}],
        "namespaces": [{"name": "default", "mtlsMode": "STRICT"}],
        "workloads": workloads,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def captured(ns: Netns, mode: str, node: MeshNode) -> bool:
    """Whether any capture state of ours exists for this netns."""
    if mode == "iptables":
        # Whichever backend the agent chose, and stale rules in the other.
        return any(read_owned(ns, family, b) for family in FAMILIES for b in Backend)
    return netns_cookie(ns) in ebpf_cookies(node)


def ebpf_cookies(node: MeshNode) -> set[int]:
    """Netns cookies holding a pin or a map entry under the node's pin root."""
    if not node.pins.root.exists():
        return set()
    with EbpfCapture(node.pins) as engine:
        return set(engine._pod_keys()) | set(node.pins.pod_links())


def agent_backend(ns: Netns) -> Backend:
    """The iptables backend holding a captured pod's rules (the agent picks one per node)."""
    holding = [b for b in Backend if read_owned(ns, 4, b)]
    assert len(holding) == 1, holding
    return holding[0]


def capture_problems(mode: str, node: MeshNode, ns: Netns) -> list[str]:
    """How the capture of this netns differs from a working one (the agent's own check)."""
    if mode == "iptables":
        return IptablesCapture(agent_backend(ns)).check(ns, CaptureConfig())
    with EbpfCapture(node.pins) as engine:
        return engine.check(ns, CaptureConfig())


def listening(ns: Netns) -> set[int]:
    """Which of the proxy's ports listen in this netns."""
    return {s.local[1] for s in tcp_sockets(ns) if s.state == TCP_LISTEN} & LISTENER_PORTS


def admin_json(node: MeshNode, port: int, section: str) -> Any:
    """One section of an admin API's /config_dump (agent 15000, proxy 15019) in the node."""
    status, body = http_get(node.node.netns, "127.0.0.1", port, f"/config_dump?section={section}")
    assert status == 200, body
    return json.loads(body)[section]


def assert_served(
    node: MeshNode, pods: Mapping[str, Pod], echo: Pod, port: int, apps: TrafficObserver
) -> None:
    """A connection from each pod reaches echo through the node's proxy, as mutual TLS."""
    proxy = node.proxy
    assert proxy is not None
    seen = len(access_log(proxy))
    with concurrent.futures.ThreadPoolExecutor(len(pods) or 1) as pool:
        attempts = dict(
            zip(
                pods,
                pool.map(
                    lambda pod: connect(pod.netns, str(echo.ipv4), port, timeout=5), pods.values()
                ),
                strict=True,
            )
        )
    for name, attempt in attempts.items():
        assert attempt.outcome == "ok", (name, attempt)
        assert apps.wait_for(attempt.token, timeout=5) is not None, name
    wanted = {f"{pod.namespace}/{pod.name}" for pod in pods.values()}
    deadline = time.monotonic() + 10
    while True:
        # The receiving side logs a connection once it ended.
        sources = {
            entry["src"].get("workload")
            for entry in access_log(proxy)[seen:]
            if entry.get("reporter") == "destination"
            and entry.get("security_policy") == "mutual_tls"
            and entry["dst"].get("workload") == f"{echo.namespace}/{echo.name}"
        }
        if wanted <= sources or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert wanted <= sources, wanted - sources
