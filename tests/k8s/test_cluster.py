"""A real two-node cluster: pods on each node talk across the underlay, Services work.

The `k8s_cluster` fixture starts it (etcd, API server, controller-manager,
scheduler in one netns; containerd, kubelet and kube-proxy in each node's
netns and mount namespace) and checks, after taking it down, that nothing
of it is left on the machine.
"""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Address

import pytest

from testbed.k8s_cluster import config
from testbed.k8s_cluster.cluster import Cluster

pytestmark = [pytest.mark.netns, pytest.mark.k8s, pytest.mark.timeout(600)]

WEB = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"


def _pod(name: str, node: str, command: str, *, host_network: bool = False) -> dict[str, object]:
    spec: dict[str, object] = {
        "nodeSelector": {"kubernetes.io/hostname": node},
        "terminationGracePeriodSeconds": 1,
        "hostNetwork": host_network,
        "containers": [
            {
                "name": "main",
                "image": config.TEST_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", command],
                "volumeMounts": [{"name": "cni-conf", "mountPath": "/node-cni"}],
            }
        ],
        # The node's own /etc/cni/net.d, as a CNI installer DaemonSet would see it.
        "volumes": [{"name": "cni-conf", "hostPath": {"path": config.NODE_CNI_CONF_DIR}}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": spec,
    }


def _ok(cluster: Cluster, *args: str) -> str:
    done = cluster.kubectl(*args)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def _eventually(cluster: Cluster, args: list[str], expected: str, timeout_s: float = 30) -> None:
    """kubectl until its output is `expected` (kube-proxy programs rules asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = cluster.kubectl(*args)
        if done.returncode == 0 and done.stdout == expected:
            return
        assert time.monotonic() < deadline, f"kubectl {' '.join(args)}: {done}"
        time.sleep(0.5)


def test_pods_on_two_nodes_exchange_data_and_reach_services(k8s_cluster: Cluster) -> None:
    cluster = k8s_cluster
    nodes = json.loads(_ok(cluster, "get", "nodes", "-o", "json"))["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["n1", "n2"]

    pods = [
        _pod("a", "n1", WEB),
        _pod("b", "n2", WEB),
        _pod("h", "n2", "exec sleep 3600", host_network=True),
    ]
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": pods})
    applied = cluster.kubectl("apply", "-f", "-", stdin=manifest)
    assert applied.returncode == 0, applied.stderr
    _ok(cluster, "wait", "--for=condition=Ready", "pod/a", "pod/b", "pod/h", "--timeout=120s")

    placed = json.loads(_ok(cluster, "get", "pods", "-o", "json"))["items"]
    ip = {p["metadata"]["name"]: IPv4Address(p["status"]["podIP"]) for p in placed}
    on = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in placed}
    assert on == {"a": "n1", "b": "n2", "h": "n2"}
    assert ip["a"] in config.node_pod_cidr(1) and ip["b"] in config.node_pod_cidr(2)
    assert ip["h"] == cluster.spec.nodes[1].address

    # Across nodes, pod to pod over the underlay, both ways.
    assert _ok(cluster, "exec", "b", "--", "wget", "-qO-", f"http://{ip['a']}:8080/") == "a\n"
    assert _ok(cluster, "exec", "a", "--", "wget", "-qO-", f"http://{ip['b']}:8080/") == "b\n"
    # From a host-network pod on n2 to the pod on n1.
    assert _ok(cluster, "exec", "h", "--", "wget", "-qO-", f"http://{ip['a']}:8080/") == "a\n"

    # kubernetes.default (the API server's Service), from a pod and from the host network:
    # plain HTTP to its TLS port gets Go's own answer, so it is the API server that replied.
    service_ip = str(cluster.spec.kubernetes_service_ip)
    probe = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {service_ip} 443"
    for pod in ("a", "h"):
        answer = _ok(cluster, "exec", pod, "--", "sh", "-c", probe)
        assert "Client sent an HTTP request to an HTTPS server" in answer

    # A Service of our own, through kube-proxy's rules on the other node.
    _ok(cluster, "expose", "pod", "a", "--port=80", "--target-port=8080", "--name=web-a")
    cluster_ip = _ok(cluster, "get", "service", "web-a", "-o", "jsonpath={.spec.clusterIP}")
    _eventually(cluster, ["exec", "b", "--", "wget", "-qO-", f"http://{cluster_ip}/"], "a\n")

    # Cluster DNS (CoreDNS behind kube-dns): the Service by its short name, through the
    # pod's search path, and the API server's Service by its full name.
    _eventually(cluster, ["exec", "b", "--", "wget", "-qO-", "http://web-a/"], "a\n")
    name = "kubernetes.default.svc.cluster.local"
    assert service_ip in _ok(cluster, "exec", "a", "--", "nslookup", name)

    # Each node's hostPath sees that node's own CNI config, not the machine's.
    for pod, index in (("a", 1), ("h", 2)):
        conflist = _ok(cluster, "exec", pod, "--", "cat", "/node-cni/10-k8s-pod-network.conflist")
        assert str(config.node_pod_cidr(index)) in conflist
