"""What every component of the test cluster is told: pure functions of a ClusterSpec.

Command lines, config files, kubeconfigs, the containerd config, the CNI
conflist and the script that lays out a node's mount namespace are all
computed here from the spec alone, so a golden test pins them
(tests/k8s/test_config.py); `cluster.py` only writes and runs them.

Layout of the state directory (all of it removed by `make k8s-down`):

```
state/
  kubeconfig          admin, through the host relay (the contract's path when state is build/k8s)
  state.json          what teardown needs: the cluster's name (its cgroups and netns)
  images/             the OCI archives imported into every node
  pki/                CA, serving and client certificates, the ServiceAccount key pair
  run/                pid files and logs
  ns/                 the nodes' mount namespaces, bind-mounted (a private mount)
  cp/                 etcd data, the control-plane components' kubeconfigs
  nodes/<name>/       containerd root, kubelet and kube-proxy config, CNI dirs, overlays
```
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final

import yaml

from node_agent.localmesh.topology import node_conflist

APISERVER_PORT: Final = 6443
KUBELET_PORT: Final = 10250
ETCD_CLIENT: Final = "http://127.0.0.1:2379"
ETCD_PEER: Final = "http://127.0.0.1:2380"
CLUSTER_DOMAIN: Final = "cluster.local"
SERVICE_CIDR: Final = IPv4Network("10.96.0.0/16")
# Every node's pod CIDR is a /24 of this; kube-proxy masquerades what comes from outside it.
CLUSTER_CIDR: Final = IPv4Network("10.244.0.0/16")
# The underlay: its bridge holds .1 (the router), the control plane .2, node i .2+i.
UNDERLAY: Final = IPv4Network("10.250.0.0/24")
UNDERLAY_BRIDGE: Final = "br0"
# The uplink's name inside the control plane's and each node's netns.
UPLINK: Final = "eth0"
TEST_IMAGE: Final = "weir.test/busybox:k8s"
SANDBOX_IMAGE: Final = "weir.test/pause:k8s"
COREDNS_IMAGE: Final = "weir.test/coredns:k8s"
# The tenth address of the Service range, as kubeadm clusters have it.
DNS_SERVICE_IP: Final = SERVICE_CIDR.network_address + 10
CONTAINERD_SOCKET: Final = "/run/containerd/containerd.sock"
# What a node's mount namespace shows at the standard paths, so that a
# DaemonSet's hostPath volumes see that node's files and never the machine's.
NODE_CNI_CONF_DIR: Final = "/etc/cni/net.d"
NODE_CNI_BIN_DIR: Final = "/opt/cni/bin"
NODE_KUBELET_DIR: Final = "/var/lib/kubelet"
# The reference plugins the conflist uses, linked into each node's /opt/cni/bin.
CNI_PLUGINS: Final = ("bridge", "host-local", "loopback", "portmap")
HOST_CNI_DIR: Final = Path("/usr/lib/cni")
# Each node's pod bridge, in its own netns, so every node can use the usual name.
NODE_BRIDGE: Final = "cni0"
# Written by the node's processes (kubelet keeps pod logs in /var/log/pods);
# each gets a copy-on-write overlay whose upper layer is in the state dir, so
# the machine's own never change.
OVERLAID: Final = ("/etc", "/opt", "/var/lib", "/var/log")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: IPv4Address
    pod_cidr: IPv4Network
    netns: str


@dataclass(frozen=True)
class ClusterSpec:
    """Names, addresses and paths of one cluster.

    `name` (wk8s-<hex>) names its cgroups and prefixes its netns, so nothing
    of it can be mistaken for another harness's (the local mesh's are wlm*).
    """

    name: str
    state_dir: Path
    bin_dir: Path
    control_plane_address: IPv4Address
    control_plane_netns: str
    nodes: tuple[NodeSpec, ...]
    host_port: int

    @property
    def underlay_netns(self) -> str:
        return f"{self.name}-underlay"

    # -- paths -------------------------------------------------------------

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def mount_ns_dir(self) -> Path:
        return self.state_dir / "ns"

    @property
    def cp_dir(self) -> Path:
        return self.state_dir / "cp"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    def node_dir(self, node: NodeSpec) -> Path:
        return self.state_dir / "nodes" / node.name

    def mount_ns(self, node: NodeSpec) -> Path:
        return self.mount_ns_dir / node.name

    def cgroup(self, node: NodeSpec) -> str:
        """The node's kubelet cgroup root, the same path in every hierarchy."""
        return f"/{self.name}/{node.name}"

    @property
    def daemon_cgroup(self) -> str:
        """Where every process the harness starts is put, so teardown finds them all."""
        return f"/{self.name}/daemons"

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.pki / f"{name}.crt", self.pki / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def apiserver_url(self) -> str:
        return f"https://{self.control_plane_address}:{APISERVER_PORT}"

    @property
    def kubernetes_service_ip(self) -> IPv4Address:
        return SERVICE_CIDR.network_address + 1


def cluster_spec(
    name: str, state_dir: Path, bin_dir: Path, node_count: int, host_port: int
) -> ClusterSpec:
    """Nodes n1..nN with the underlay's and the cluster CIDR's addresses in order."""
    router = UNDERLAY.network_address + 1
    nodes = tuple(
        NodeSpec(f"n{i}", router + 1 + i, node_pod_cidr(i), f"{name}-n{i}")
        for i in range(1, node_count + 1)
    )
    return ClusterSpec(name, state_dir, bin_dir, router + 1, f"{name}-cp", nodes, host_port)


def network_plan(spec: ClusterSpec) -> dict[str, list[str]]:
    """`ip -batch` lines per netns, underlay first: veths, addresses, routes.

    Every veth is made from inside the underlay with its peer moved straight
    into the other netns, so no link ever exists in the host's netns. The
    underlay has no default route: traffic for anything but the cluster's
    addresses ends there (host unreachable), and nothing leaves the machine.
    """
    router = UNDERLAY.network_address + 1
    hosts = [(spec.control_plane_netns, spec.control_plane_address)]
    hosts += [(n.netns, n.address) for n in spec.nodes]
    underlay = [
        "link set lo up",
        f"link add {UNDERLAY_BRIDGE} type bridge",
        f"link set {UNDERLAY_BRIDGE} up",
        f"addr add {router}/{UNDERLAY.prefixlen} dev {UNDERLAY_BRIDGE}",
    ]
    for index, (netns, _) in enumerate(hosts):
        underlay.append(f"link add u{index} type veth peer name {UPLINK} netns {netns}")
        underlay.append(f"link set u{index} master {UNDERLAY_BRIDGE} up")
    underlay += [f"route add {n.pod_cidr} via {n.address}" for n in spec.nodes]
    plan = {spec.underlay_netns: underlay}
    for netns, address in hosts:
        plan[netns] = [
            "link set lo up",
            f"link set {UPLINK} up",
            f"addr add {address}/{UNDERLAY.prefixlen} dev {UPLINK}",
            f"route add default via {router}",
            *(f"route add {n.pod_cidr} via {n.address}" for n in spec.nodes if n.netns != netns),
        ]
    return plan


def node_pod_cidr(index: int) -> IPv4Network:
    """Node `index` (from 1) owns the index-th /24 of the cluster CIDR."""
    return list(CLUSTER_CIDR.subnets(new_prefix=24))[index]


def client_certificates(spec: ClusterSpec) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Client certificate name -> (CN, organizations), as the default RBAC roles expect."""
    certs: dict[str, tuple[str, tuple[str, ...]]] = {
        "admin": ("weir-admin", ("system:masters",)),
        "controller-manager": ("system:kube-controller-manager", ()),
        "scheduler": ("system:kube-scheduler", ()),
        "kube-proxy": ("system:kube-proxy", ()),
        "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", ("system:masters",)),
    }
    for node in spec.nodes:
        certs[f"node-{node.name}"] = (f"system:node:{node.name}", ("system:nodes",))
    return certs


def apiserver_sans(spec: ClusterSpec) -> tuple[list[str], list[IPv4Address]]:
    """DNS names and IPs the API server's certificate is valid for."""
    names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    names.append(f"kubernetes.default.svc.{CLUSTER_DOMAIN}")
    ips = [spec.control_plane_address, spec.kubernetes_service_ip, IPv4Address("127.0.0.1")]
    return names, ips


def kubeconfig(spec: ClusterSpec, server: str, cert_name: str) -> str:
    cert, key = spec.cert(cert_name)
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": spec.name,
                    "cluster": {"server": server, "certificate-authority": str(spec.ca)},
                }
            ],
            "users": [
                {
                    "name": cert_name,
                    "user": {"client-certificate": str(cert), "client-key": str(key)},
                }
            ],
            "contexts": [{"name": spec.name, "context": {"cluster": spec.name, "user": cert_name}}],
            "current-context": spec.name,
        },
        sort_keys=False,
    )


def kubeconfigs(spec: ClusterSpec) -> dict[Path, str]:
    """Every kubeconfig the cluster needs, by where it is written."""
    inside_cp = f"https://127.0.0.1:{APISERVER_PORT}"
    files = {
        spec.admin_kubeconfig: kubeconfig(spec, f"https://127.0.0.1:{spec.host_port}", "admin"),
        spec.cp_dir / "controller-manager.kubeconfig": kubeconfig(
            spec, inside_cp, "controller-manager"
        ),
        spec.cp_dir / "scheduler.kubeconfig": kubeconfig(spec, inside_cp, "scheduler"),
    }
    for node in spec.nodes:
        directory = spec.node_dir(node)
        files[directory / "kubelet.kubeconfig"] = kubeconfig(
            spec, spec.apiserver_url, f"node-{node.name}"
        )
        files[directory / "kube-proxy.kubeconfig"] = kubeconfig(
            spec, spec.apiserver_url, "kube-proxy"
        )
    return files


def etcd_argv(spec: ClusterSpec) -> list[str]:
    return [
        str(spec.bin_dir / "etcd"),
        "--name=cp",
        f"--data-dir={spec.cp_dir / 'etcd'}",
        f"--listen-client-urls={ETCD_CLIENT}",
        f"--advertise-client-urls={ETCD_CLIENT}",
        f"--listen-peer-urls={ETCD_PEER}",
        f"--initial-advertise-peer-urls={ETCD_PEER}",
        f"--initial-cluster=cp={ETCD_PEER}",
        # A throwaway cluster: losing it in a power cut costs nothing, fsyncs cost seconds.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def apiserver_argv(spec: ClusterSpec) -> list[str]:
    cert, key = spec.cert("apiserver")
    kubelet_cert, kubelet_key = spec.cert("apiserver-kubelet-client")
    return [
        str(spec.bin_dir / "kube-apiserver"),
        f"--advertise-address={spec.control_plane_address}",
        f"--secure-port={APISERVER_PORT}",
        f"--etcd-servers={ETCD_CLIENT}",
        f"--tls-cert-file={cert}",
        f"--tls-private-key-file={key}",
        f"--client-ca-file={spec.ca}",
        "--authorization-mode=Node,RBAC",
        # On top of the default set, as kubeadm clusters have it.
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
        f"--service-account-key-file={spec.pki / 'sa.pub'}",
        f"--service-account-signing-key-file={spec.pki / 'sa.key'}",
        f"--kubelet-client-certificate={kubelet_cert}",
        f"--kubelet-client-key={kubelet_key}",
        "--kubelet-preferred-address-types=InternalIP",
        "--profiling=false",
    ]


def controller_manager_argv(spec: ClusterSpec) -> list[str]:
    config = spec.cp_dir / "controller-manager.kubeconfig"
    ca_cert, ca_key = spec.cert("ca")
    return [
        str(spec.bin_dir / "kube-controller-manager"),
        f"--kubeconfig={config}",
        f"--authentication-kubeconfig={config}",
        f"--authorization-kubeconfig={config}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        f"--service-account-private-key-file={spec.pki / 'sa.key'}",
        f"--root-ca-file={spec.ca}",
        f"--cluster-signing-cert-file={ca_cert}",
        f"--cluster-signing-key-file={ca_key}",
        "--use-service-account-credentials=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # Each node's pod CIDR is fixed by its conflist (host-local), not allocated here.
        "--allocate-node-cidrs=false",
        "--profiling=false",
    ]


def scheduler_argv(spec: ClusterSpec) -> list[str]:
    config = spec.cp_dir / "scheduler.kubeconfig"
    return [
        str(spec.bin_dir / "kube-scheduler"),
        f"--kubeconfig={config}",
        f"--authentication-kubeconfig={config}",
        f"--authorization-kubeconfig={config}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--profiling=false",
    ]


def kubelet_config(spec: ClusterSpec, node: NodeSpec) -> str:
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": str(node.address),
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        # Loopback is the node netns' own, so every kubelet can have the usual port.
        "healthzBindAddress": "127.0.0.1",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(spec.ca)},
        },
        "authorization": {"mode": "Webhook"},
        # PID 1 is not systemd here, and the controllers are cgroup v1, which
        # 1.34 kubelets still accept unless told to fail.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupRoot": spec.cgroup(node),
        "cgroupsPerQOS": True,
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [str(DNS_SERVICE_IP)],
        "resolvConf": "/etc/resolv.conf",
        "staticPodPath": "",
        "rotateCertificates": False,
        "serializeImagePulls": False,
        # The images cannot be pulled again (no registry), so the kubelet must
        # never collect them, and the machine's disk is shared by every node.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


def kubelet_argv(spec: ClusterSpec, node: NodeSpec) -> list[str]:
    directory = spec.node_dir(node)
    return [
        str(spec.bin_dir / "kubelet"),
        f"--config={directory / 'kubelet.yaml'}",
        f"--kubeconfig={directory / 'kubelet.kubeconfig'}",
        f"--hostname-override={node.name}",
        f"--node-ip={node.address}",
        f"--root-dir={NODE_KUBELET_DIR}",
        "--v=1",
    ]


def kube_proxy_config(spec: ClusterSpec, node: NodeSpec) -> str:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(spec.node_dir(node) / "kube-proxy.kubeconfig")},
        "hostnameOverride": node.name,
        "bindAddress": str(node.address),
        "healthzBindAddress": f"{node.address}:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "clusterCIDR": str(CLUSTER_CIDR),
        # The conntrack table and its timeouts belong to the machine, not to a
        # node netns (read-only there): leave them as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": {"minSyncPeriod": "1s", "syncPeriod": "30s"},
        # Its default of -999 needs CAP_SYS_RESOURCE, which this machine withholds.
        "oomScoreAdj": 0,
    }
    return yaml.safe_dump(config, sort_keys=False)


def kube_proxy_argv(spec: ClusterSpec, node: NodeSpec) -> list[str]:
    return [
        str(spec.bin_dir / "kube-proxy"),
        f"--config={spec.node_dir(node) / 'kube-proxy.yaml'}",
        "--v=1",
    ]


COREDNS_CONFIG: Final = f"""\
.:53 {{
    errors
    health {{
        lameduck 5s
    }}
    ready
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
    reload
}}
"""
# No `forward`: nothing outside the machine answers, so other names fail at once.


def coredns_manifests() -> str:
    """Cluster DNS as kubeadm deploys it: CoreDNS in kube-system behind kube-dns."""
    labels = {"k8s-app": "kube-dns"}
    meta = {"name": "coredns", "namespace": "kube-system"}
    rules = [
        {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
         "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["list", "watch"]},
    ]  # fmt: skip
    container = {
        "name": "coredns",
        "image": COREDNS_IMAGE,
        "imagePullPolicy": "Never",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 1},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
    }
    pod_spec = {
        "serviceAccountName": "coredns",
        "priorityClassName": "system-cluster-critical",
        # Its own upstream is the node's resolv.conf, never itself.
        "dnsPolicy": "Default",
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
    }
    items: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", **meta}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
         "data": {"Corefile": COREDNS_CONFIG}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta, "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {"selector": labels, "clusterIP": str(DNS_SERVICE_IP),
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
    ]  # fmt: skip
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2) + "\n"


def containerd_config(spec: ClusterSpec, node: NodeSpec) -> str:
    """containerd 1.6 (Debian 12) with CRI: its root under the node's dir, state in its /run."""
    root = spec.node_dir(node) / "containerd"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join(
        [
            "version = 2",
            f'root = "{root}"',
            # /run is the node's own tmpfs (see mount_setup_script).
            'state = "/run/containerd"',
            "disabled_plugins = [",
            '  "io.containerd.snapshotter.v1.aufs",',
            '  "io.containerd.snapshotter.v1.btrfs",',
            '  "io.containerd.snapshotter.v1.zfs",',
            '  "io.containerd.snapshotter.v1.devmapper",',
            "]",
            "",
            "[grpc]",
            f'  address = "{CONTAINERD_SOCKET}"',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{root}/opt"',
            "",
            f"[{cri}]",
            f'  sandbox_image = "{SANDBOX_IMAGE}"',
            # This machine's bounding set lacks CAP_SYS_RESOURCE, so no process may
            # lower its oom_score_adj below 0: runc would fail on the sandbox's -998.
            "  restrict_oom_score_adj = true",
            "",
            f"[{cri}.cni]",
            f'  bin_dir = "{NODE_CNI_BIN_DIR}"',
            f'  conf_dir = "{NODE_CNI_CONF_DIR}"',
            "",
            f"[{cri}.containerd]",
            '  snapshotter = "overlayfs"',
            '  default_runtime_name = "runc"',
            "",
            f"[{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            "",
            f"[{cri}.containerd.runtimes.runc.options]",
            "  SystemdCgroup = false",
            "",
        ]
    )


def containerd_argv(spec: ClusterSpec, node: NodeSpec) -> list[str]:
    return ["containerd", "--config", str(spec.node_dir(node) / "containerd.toml")]


def cni_conflist(node: NodeSpec) -> str:
    """The node's primary network: bridge + host-local over its own pod CIDR."""
    conflist = node_conflist(
        network="k8s-pod-network",
        bridge=NODE_BRIDGE,
        pod_cidr_v4=node.pod_cidr,
        pod_cidr_v6=None,
        # The node's own /var/lib (an overlay), as on a real node.
        ipam_data_dir=Path("/var/lib/cni/networks"),
    )
    return json.dumps(conflist, indent=2) + "\n"


def overlay_dirs(spec: ClusterSpec, node: NodeSpec) -> Mapping[str, Path]:
    """Host directories shown under a writable overlay in the node: path -> upper/work parent."""
    return {path: spec.node_dir(node) / "overlay" / path.strip("/") for path in OVERLAID}


def mount_setup_script(spec: ClusterSpec, node: NodeSpec) -> str:
    """Shell run once inside the node's new mount namespace (and its netns).

    The namespace starts as a private copy of the host's mounts. Copies of
    other namespaces' nsfs mounts would keep those namespaces alive after
    their owners delete them, so they are dropped first. /sys is mounted anew
    from inside the node netns (its /sys/class/net lists the node's links),
    keeping the cgroup tree, with a bpffs of the node's own at /sys/fs/bpf.
    """
    directory = spec.node_dir(node)
    q = shlex.quote
    lines = [
        "set -eu",
        # Stacked copies of one target go with the first umount, so one may fail; none may stay.
        'findmnt -rn -t nsfs -o TARGET | tac | while read -r t; do umount -l "$t" || true; done',
        "if findmnt -rn -t nsfs; then echo 'nsfs mounts remain' >&2; exit 1; fi",
        "mount -t tmpfs -o mode=0755 tmpfs /run",
        "mkdir /run/cgroup-keep",
        "mount --rbind /sys/fs/cgroup /run/cgroup-keep",
        "mount -t sysfs sysfs /sys",
        "mount --move /run/cgroup-keep /sys/fs/cgroup",
        "rmdir /run/cgroup-keep",
        # The node's own bpffs, as systemd mounts at boot: eBPF pins (Weir's
        # agent keeps its capture there) outlive the processes that made them.
        # A new instance, not the machine's: each node's pins stay its own.
        "mount -t bpf bpf /sys/fs/bpf",
    ]
    for path, layer in overlay_dirs(spec, node).items():
        lines.append(
            f"mount -t overlay overlay -o lowerdir={path},"
            f"upperdir={q(str(layer / 'upper'))},workdir={q(str(layer / 'work'))} {path}"
        )
    binds = {
        directory / "cni-conf": NODE_CNI_CONF_DIR,
        directory / "cni-bin": NODE_CNI_BIN_DIR,
        directory / "kubelet": NODE_KUBELET_DIR,
    }
    for source, target in binds.items():
        lines.append(f"mkdir -p {target}")
        lines.append(f"mount --bind {q(str(source))} {target}")
    # Shared, as on a systemd host, and only now (a move out of a shared mount is
    # refused): the netns files containerd mounts later must reach containers
    # that mount /var/run/netns with HostToContainer propagation, and containerd
    # refuses that propagation from a private mount. The peer groups are new ones
    # of this namespace (it was made private), so nothing reaches the machine's.
    lines.append("mount --make-rshared /")
    return "\n".join(lines) + "\n"


def node_dirs(spec: ClusterSpec, node: NodeSpec) -> Sequence[Path]:
    """Directories to create on the host before the node's mounts are set up."""
    directory = spec.node_dir(node)
    dirs = [directory / d for d in ("cni-conf", "cni-bin", "kubelet", "containerd")]
    for layer in overlay_dirs(spec, node).values():
        dirs += [layer / "upper", layer / "work"]
    return dirs
