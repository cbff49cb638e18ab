"""What the test cluster's components are told, pinned by golden files (`make goldens`)."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from testbed.k8s_cluster import config

SPEC = config.cluster_spec("wk8s-000000", Path("/state"), Path("/k8s-bin"), 2, 16443)
NODE = SPEC.nodes[0]


def _sections(parts: dict[str, str | list[str]]) -> str:
    out = []
    for title, body in parts.items():
        text = " \\\n  ".join(body) if isinstance(body, list) else body.rstrip("\n")
        out.append(f"## {title}\n{text}\n")
    return "\n".join(out)


def test_control_plane_matches_golden(golden: Callable[[str, str], None]) -> None:
    kubeconfigs = {f"kubeconfig {p}": text for p, text in config.kubeconfigs(SPEC).items()}
    golden(
        "k8s/control-plane.txt",
        _sections(
            {
                "etcd": config.etcd_argv(SPEC),
                "kube-apiserver": config.apiserver_argv(SPEC),
                "kube-controller-manager": config.controller_manager_argv(SPEC),
                "kube-scheduler": config.scheduler_argv(SPEC),
                **kubeconfigs,
                "cluster DNS manifests": config.coredns_manifests(),
            }
        ),
    )


def test_node_matches_golden(golden: Callable[[str, str], None]) -> None:
    golden(
        "k8s/node-n1.txt",
        _sections(
            {
                "containerd": config.containerd_argv(SPEC, NODE),
                "containerd.toml": config.containerd_config(SPEC, NODE),
                "kubelet": config.kubelet_argv(SPEC, NODE),
                "kubelet.yaml": config.kubelet_config(SPEC, NODE),
                "kube-proxy": config.kube_proxy_argv(SPEC, NODE),
                "kube-proxy.yaml": config.kube_proxy_config(SPEC, NODE),
                "10-k8s-pod-network.conflist": config.cni_conflist(NODE),
                "mount namespace setup": config.mount_setup_script(SPEC, NODE),
            }
        ),
    )


def test_network_matches_golden(golden: Callable[[str, str], None]) -> None:
    plan = config.network_plan(SPEC)
    golden(
        "k8s/network.txt",
        _sections({f"ip -n {ns} -batch -": "\n".join(ls) for ns, ls in plan.items()}),
    )


def test_nodes_get_disjoint_pod_cidrs_inside_the_cluster_cidr() -> None:
    cidrs = [config.node_pod_cidr(i) for i in range(1, 4)]
    assert cidrs == [IPv4Network(f"10.244.{i}.0/24") for i in range(1, 4)]
    assert all(c.subnet_of(config.CLUSTER_CIDR) for c in cidrs)


def test_every_node_and_component_has_a_client_certificate() -> None:
    certs = config.client_certificates(SPEC)
    assert certs["node-n2"] == ("system:node:n2", ("system:nodes",))
    assert certs["kube-proxy"] == ("system:kube-proxy", ())
    names, ips = config.apiserver_sans(SPEC)
    assert "kubernetes.default.svc.cluster.local" in names
    assert IPv4Address("10.96.0.1") in ips and SPEC.control_plane_address in ips
