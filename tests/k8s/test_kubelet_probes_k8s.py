"""Real kubelet probes of a STRICT-captured pod, on the Kubernetes test cluster.

A pod on n1 serves HTTP on 8080 with an httpGet readiness probe every
second. Capture is then applied in its netns by hand, with a stand-in for
the proxy under STRICT on 15006 (accepts, then aborts with RST, as the real
proxy does with plaintext): the kubelet's probes land there and the pod goes
NotReady. The node's WEIR-HOST-PROBES, written into n1's netns in the
backend its kube-proxy rules use, make it Ready again; removing them makes it
NotReady once more, so the test can fail. The agent and proxy themselves are
not run: this is about the kubelet, capture and the node's rules.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from node_agent import netns as netns_mod
from node_agent.constants import INBOUND_PLAINTEXT_CAPTURE_PORT
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend, choose_backend, probe_host
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.host_probes import HostProbes, remove_host_probes
from node_agent.redirect.iptables import IptablesCapture
from testbed.k8s_cluster import config
from testbed.k8s_cluster.cluster import Cluster

pytestmark = [pytest.mark.netns, pytest.mark.k8s, pytest.mark.timeout(600)]

NAMESPACE: Final = "probes"
APP_PORT: Final = 8080
NETNS_DIR: Final = Path("/var/run/netns")

POD: Final = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "app", "namespace": NAMESPACE},
    "spec": {
        "nodeName": "n1",
        "terminationGracePeriodSeconds": 0,
        "containers": [
            {
                "name": "app",
                "image": config.TEST_IMAGE,
                "command": [
                    "sh",
                    "-c",
                    "mkdir -p /www && echo ok > /www/healthz && "
                    f"exec httpd -f -p {APP_PORT} -h /www",
                ],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": APP_PORT},
                    "periodSeconds": 1,
                    "timeoutSeconds": 1,
                    "failureThreshold": 1,
                },
            }
        ],
    },
}


def ok(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    done = cluster.kubectl(*args, stdin=stdin)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def ready(cluster: Cluster) -> str:
    return ok(
        cluster,
        *("-n", NAMESPACE, "get", "pod", "app"),
        "-o",
        "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
    )


def wait_ready(cluster: Cluster, want: str, timeout_s: float = 45.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (seen := ready(cluster)) != want:
        assert time.monotonic() < deadline, f"pod never became Ready={want} (last: {seen!r})"
        time.sleep(0.5)
    # Held for a few probe periods: one lucky probe is not a state.
    for _ in range(4):
        time.sleep(1)
        assert ready(cluster) == want


def pod_netns(uid: str) -> Netns:
    """The pod's netns, through a process whose cgroup names the pod's UID."""
    marks = (f"pod{uid}", f"pod{uid.replace('-', '_')}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(m in (proc / "cgroup").read_text() for m in marks):
                return Netns.validate(proc / "ns" / "net")
    raise AssertionError(f"no process of pod {uid} found in /proc")


class StrictStandIn:
    """Accepts on 15006 in the pod's netns and aborts every connection (RST)."""

    def __init__(self, ns: Netns) -> None:
        with netns_mod.entered(ns):
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("0.0.0.0", INBOUND_PLAINTEXT_CAPTURE_PORT))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            self.refused += 1

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=2)


@pytest.fixture
def app(k8s_cluster: Cluster) -> Iterator[tuple[Netns, str, str]]:
    """(pod netns, pod UID, pod IP) of a Ready pod on n1; the namespace is deleted afterwards."""
    ok(k8s_cluster, "create", "namespace", NAMESPACE)
    try:
        ok(k8s_cluster, "apply", "-f", "-", stdin=json.dumps(POD))
        wait_ready(k8s_cluster, "True", timeout_s=90)
        pod = json.loads(ok(k8s_cluster, "-n", NAMESPACE, "get", "pod", "app", "-o", "json"))
        uid, ip = pod["metadata"]["uid"], pod["status"]["podIP"]
        yield pod_netns(uid), uid, ip
    finally:
        k8s_cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false")


def test_kubelet_probes_pass_through_capture_only_with_the_node_rules(k8s_cluster, app):
    ns, uid, ip = app
    node = Netns.validate(NETNS_DIR / k8s_cluster.spec.nodes[0].netns)
    with netns_mod.entered(node):
        # What the agent does on a node: follow the backend kube-proxy's rules are in.
        backend = choose_backend(None, probe_host()).backend
    capture = IptablesCapture(Backend.NFT)
    stand_in = StrictStandIn(ns)
    try:
        capture.apply(ns, CaptureConfig())
        wait_ready(k8s_cluster, "False")
        assert stand_in.refused > 0, "the probes did not land on the proxy's port"

        host = HostProbes(backend, node)
        host.add(uid, [ip])
        wait_ready(k8s_cluster, "True")
        refused = stand_in.refused
        time.sleep(2)
        assert stand_in.refused == refused, "probes still reach the proxy's port"

        assert remove_host_probes(node)
        wait_ready(k8s_cluster, "False")
    finally:
        remove_host_probes(node)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            capture.remove(ns)
        stand_in.close()
