"""What the install tests share: objects to apply, kubectl steps, and checks.

`tests/k8s/test_weir_install.py` (iptables, the default install) and
`tests/k8s/test_weir_install_ebpf.py` (the ebpf variant) install Weir on the
test cluster the same way and check it the same way.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from testbed.k8s_cluster import config
from testbed.k8s_cluster.cluster import Cluster

REPO: Final = Path(__file__).resolve().parents[2]
SYSTEM: Final = "weir-system"
MESHED: Final = "shop"
PLAIN: Final = "plain"
TRUST_DOMAIN: Final = "cluster.local"
# busybox httpd answers with the pod's hostname, so a reply names the pod that served it.
WEB: Final = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p {port} -h /www"
READY_TIMEOUT: Final = "240s"


def _spiffe(namespace: str, account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}"


def _ok(cluster: Cluster, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
    done = cluster.kubectl(*args, stdin=stdin, timeout=timeout)
    assert done.returncode == 0, f"kubectl {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _apply(cluster: Cluster, *objects: dict[str, Any]) -> None:
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    _ok(cluster, "apply", "-f", "-", stdin=manifest)


def _namespace(name: str, *, meshed: bool) -> dict[str, Any]:
    labels = {"weir.dev/mesh": "enabled"} if meshed else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _account(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    }


def _container(port: int) -> dict[str, Any]:
    """A web server on `port`, probed by the kubelet over HTTP (readiness) and TCP (liveness).

    Tight periods, so a probe that capture breaks shows within seconds as
    NotReady or as restarts.
    """
    return {
        "name": "main",
        "image": config.TEST_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", WEB.format(port=port)],
        "readinessProbe": {
            "httpGet": {"path": "/", "port": port},
            "periodSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "tcpSocket": {"port": port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
    }


def _pod_spec(node: str, account: str, port: int) -> dict[str, Any]:
    return {
        "nodeSelector": {"kubernetes.io/hostname": node},
        "serviceAccountName": account,
        "terminationGracePeriodSeconds": 1,
        "containers": [_container(port)],
    }


def _deployment(namespace: str, name: str, node: str, port: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec(node, name, port)},
        },
    }


def _pod(namespace: str, name: str, node: str, account: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": _pod_spec(node, account, 9000),
    }


def _service(namespace: str, name: str, port: int, target: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": target}]},
    }


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = _ok(cluster, "get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _on_node(cluster: Cluster, namespace: str, selector: str, node: str) -> str:
    names: list[str] = [
        p["metadata"]["name"]
        for p in _pods(cluster, namespace, selector)
        if p["spec"].get("nodeName") == node and not p["metadata"].get("deletionTimestamp")
    ]
    assert len(names) == 1, f"{selector} on {node}: {names}"
    return names[0]


def _fetch_local(cluster: Cluster, pod: str, url: str) -> str:
    """GET `url` from inside a Weir pod (host network: its loopback is the node's)."""
    script = (
        "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
    )
    return _ok(cluster, "exec", "-n", SYSTEM, pod, "--", "python3", "-c", script, url)


def _admin_section(cluster: Cluster, node: str, section: str) -> Any:
    agent = _on_node(cluster, SYSTEM, "app.kubernetes.io/name=weir-agent", node)
    dump = json.loads(_fetch_local(cluster, agent, "http://127.0.0.1:15000/config_dump"))
    return dump[section]


def _wget(cluster: Cluster, namespace: str, pod: str, url: str) -> subprocess.CompletedProcess[str]:
    # busybox's own `wget -T` crashes (SIGSEGV) in the static build; its timeout applet does not.
    return cluster.kubectl("exec", "-n", namespace, pod, "--", "timeout", "3", "wget", "-qO-", url)


def _until(
    what: str, check: Callable[[], object], timeout_s: float, interval_s: float = 0.5
) -> float:
    """Call `check` until it returns true; the seconds it took. Fails after `timeout_s`."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout_s:
        last = check()
        if last:
            return time.monotonic() - started
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")


def _server_url() -> str:
    return f"http://server.{MESHED}.svc.cluster.local/"


def _node_shell(cluster: Cluster, node: config.NodeSpec, script: str) -> str:
    """Run `script` in the node's mount and network namespaces, as its daemons run."""
    netns = Path("/var/run/netns") / node.netns
    done = subprocess.run(
        ["nsenter", f"--mount={cluster.spec.mount_ns(node)}", f"--net={netns}", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{script}: {done.stderr}"
    return done.stdout


WEIR_WORKLOADS: Final = (
    "deployment/weir-controlplane",
    "daemonset/weir-agent",
    "daemonset/weir-proxy",
)


def install(cluster: Cluster, kustomization: Path) -> None:
    """`kubectl apply -k`, then wait until every Weir workload has rolled out."""
    _ok(cluster, "apply", "-k", str(kustomization))
    for workload in WEIR_WORKLOADS:
        _ok(cluster, "rollout", "status", "-n", SYSTEM, workload,
            f"--timeout={READY_TIMEOUT}", timeout=300)  # fmt: skip


def wait_ready(cluster: Cluster, pods: Iterable[tuple[str, str]]) -> None:
    """Wait until the pods of each (namespace, label selector) are Ready."""
    for namespace, selector in pods:
        _ok(cluster, "wait", "-n", namespace, "--for=condition=Ready", "pod", "-l", selector,
            f"--timeout={READY_TIMEOUT}", timeout=300)  # fmt: skip


def assert_probes_held(cluster: Cluster, namespace: str, selectors: Iterable[str]) -> None:
    """Several probe periods after Ready: still Ready, and liveness restarted nothing."""
    time.sleep(10)
    for selector in selectors:
        for pod in _pods(cluster, namespace, selector):
            conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
            assert conditions["Ready"] == "True", (selector, pod["status"])
            restarts = [s["restartCount"] for s in pod["status"]["containerStatuses"]]
            assert restarts == [0], (selector, restarts)


def mtls_connections_opened(metrics: str, source: str, destination: str) -> float:
    """istio_tcp_connections_opened_total over mutual TLS between two identities."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'connection_security_policy="mutual_tls"' in line
        and f'source_principal="{source}"' in line
        and f'destination_principal="{destination}"' in line
    )
