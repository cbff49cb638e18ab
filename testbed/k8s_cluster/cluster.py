"""Start and stop a Kubernetes cluster of network namespaces on this machine.

```
  host netns: only the admin relay, a listener on 127.0.0.1:<port>
  wk8s-<id>-underlay: bridge br0 10.250.0.1, forwards, no default route (the sink)
    |-- wk8s-<id>-cp  10.250.0.2: etcd, kube-apiserver :6443, controller-manager, scheduler
    |-- wk8s-<id>-n1  10.250.0.3 + own mount ns: containerd (CRI), kubelet, kube-proxy,
    |                 pods on cni0 (10.244.1.0/24)
    `-- wk8s-<id>-n2 ...
```

The cluster outlives the process that started it: every process is started
detached (setsid), put into the cluster's cgroup and given a pid file, and
`state.json` records what teardown needs. `down()` works from that state
alone: it kills everything in the cluster's cgroups (daemons, shims,
containers), removes the cgroups, the mount namespaces and the netns, and
deletes the state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from node_agent.localmesh.topology import NETNS_DIR
from testbed.images import build_busybox_image
from testbed.k8s_cluster import config
from testbed.k8s_cluster.config import ClusterSpec, NodeSpec
from testbed.k8s_cluster.pki import write_pki
from weir_common.errors import WeirError

REPO: Final = Path(__file__).resolve().parents[2]
CGROUP_FS: Final = Path("/sys/fs/cgroup")
# The daemons' cgroup only needs a hierarchy that every process can join.
DAEMON_HIERARCHY: Final = CGROUP_FS / "pids"
STATE_FILE: Final = "state.json"
_START_TIMEOUT_S: Final = 120.0
_STEP_TIMEOUT_S: Final = 60.0


class ClusterError(WeirError):
    """The cluster could not be started or fully removed; the message says what and why."""


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Cluster:
    """A running cluster: its spec, and kubectl pointed at it.

    `namespaces` holds the inodes of its network and mount namespaces, by
    which `leftovers` recognises a process still inside one.
    """

    spec: ClusterSpec
    namespaces: frozenset[int]

    def down(self) -> None:
        down(self.spec.state_dir)

    def kubectl_argv(self, *args: str) -> list[str]:
        """The command line of kubectl with the admin kubeconfig (for one run in the background)."""
        return [
            str(self.spec.bin_dir / "kubectl"),
            f"--kubeconfig={self.spec.admin_kubeconfig}",
            # Not ~/.kube/cache: each cluster's relay port would leave a directory there.
            f"--cache-dir={self.spec.state_dir / 'kubectl-cache'}",
            *args,
        ]

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = _STEP_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """kubectl with the admin kubeconfig (never raises on exit code)."""
        return subprocess.run(
            self.kubectl_argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def ensure_binaries(python: Path = Path(sys.executable)) -> Path:
    """Build whatever Kubernetes binary is missing (scripts/build-k8s.sh); their directory."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "build-k8s.sh"), str(python)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise ClusterError(f"scripts/build-k8s.sh failed with exit code {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


# -- the pieces of `up` ------------------------------------------------------


def _hierarchies() -> list[Path]:
    return sorted(p for p in CGROUP_FS.iterdir() if (p / "cgroup.procs").exists())


def _make_cgroups(spec: ClusterSpec) -> None:
    """The cluster's cgroup and each node's cgroup root, in every hierarchy.

    A kubelet refuses a --cgroup-root that does not exist. A new cpuset
    cgroup starts with no CPUs and no memory nodes, so it gets its parent's.
    """
    paths = [f"/{spec.name}", spec.daemon_cgroup, *(spec.cgroup(n) for n in spec.nodes)]
    for hierarchy in _hierarchies():
        for path in paths:
            directory = hierarchy / path.lstrip("/")
            directory.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (directory / name).exists():
                    (directory / name).write_text((directory.parent / name).read_text())


def _start(
    spec: ClusterSpec,
    name: str,
    argv: Sequence[str],
    *,
    netns: str | None,
    mount_ns: Path | None = None,
    pass_fds: Sequence[int] = (),
) -> None:
    """Start a detached daemon in the cluster's cgroup; pid file and log in run/."""
    enter: list[str] = []
    if netns is not None:
        enter = ["nsenter", f"--net={NETNS_DIR / netns}"]
        if mount_ns is not None:
            enter.append(f"--mount={mount_ns}")
        enter.append("--")
    procs = DAEMON_HIERARCHY / spec.daemon_cgroup.lstrip("/") / "cgroup.procs"
    pid_file = spec.run_dir / f"{name}.pid"
    # Into the cgroup before anything else runs, so that teardown finds the
    # process and all it forks (containerd's shims) even if it dies at once.
    wrapper = 'echo $$ >"$1" && echo $$ >"$2" && shift 2 && exec "$@"'
    with (spec.run_dir / f"{name}.log").open("ab") as log:
        subprocess.run(
            [
                "setsid",
                "--fork",
                "sh",
                "-c",
                wrapper,
                "sh",
                str(procs),
                str(pid_file),
                *enter,
                *argv,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=pass_fds,
            check=True,
            timeout=_STEP_TIMEOUT_S,
            cwd=spec.state_dir,
            # testbed is not installed (it is not in the wheel): the relay finds it here.
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def _log_tail(spec: ClusterSpec, name: str, lines: int = 15) -> str:
    path = spec.run_dir / f"{name}.log"
    if not path.exists():
        return f"({path} does not exist)"
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"last lines of {path}:\n" + "\n".join(tail)


def _wait(
    spec: ClusterSpec, what: str, ready: Callable[[], bool], logs: Sequence[str], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            details = "\n".join(_log_tail(spec, name) for name in logs)
            raise ClusterError(f"{what} not ready within {timeout_s:g} s\n{details}")
        time.sleep(0.5)


_IMPORT_TIMEOUT_S = 240.0


def _run(
    argv: Sequence[str], what: str, *, stdin: str | None = None, timeout: float = _STEP_TIMEOUT_S
) -> str:
    proc = subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise ClusterError(f"{what}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _write_files(spec: ClusterSpec) -> None:
    for path, text in config.kubeconfigs(spec).items():
        _write(path, text)
    for node in spec.nodes:
        directory = spec.node_dir(node)
        for sub in config.node_dirs(spec, node):
            sub.mkdir(parents=True, exist_ok=True)
        _write(directory / "kubelet.yaml", config.kubelet_config(spec, node))
        _write(directory / "kube-proxy.yaml", config.kube_proxy_config(spec, node))
        _write(directory / "containerd.toml", config.containerd_config(spec, node))
        _write(directory / "cni-conf" / "10-k8s-pod-network.conflist", config.cni_conflist(node))
        for plugin in config.CNI_PLUGINS:
            (directory / "cni-bin" / plugin).symlink_to(config.HOST_CNI_DIR / plugin)


def _make_network(spec: ClusterSpec) -> None:
    """The netns of config.network_plan, wired; all are created before the veths."""
    plan = config.network_plan(spec)
    for netns in plan:
        _run(["ip", "netns", "add", netns], f"netns {netns}")
    for netns, commands in plan.items():
        # The underlay routes between nodes, the nodes between their pods and it.
        forward = ["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]
        _run(forward, f"forwarding in {netns}")
        batch = "".join(f"{c}\n" for c in commands)
        _run(["ip", "-n", netns, "-batch", "-"], f"network of {netns}", stdin=batch)


def _delete_network(name: str) -> None:
    for path in sorted(NETNS_DIR.glob(f"{name}-*")):
        _run(["ip", "netns", "delete", path.name], f"delete netns {path.name}")


def _make_mount_namespace(spec: ClusterSpec, node: NodeSpec) -> None:
    """A persistent mount namespace (bind-mounted in ns/) laid out as a node's filesystem."""
    ns_dir = spec.mount_ns_dir
    # Path.is_mount cannot see a bind mount of a directory onto itself.
    if str(ns_dir) not in _mounts_under(ns_dir):
        # A namespace file can only be bind-mounted under a private mount.
        ns_dir.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(ns_dir), str(ns_dir)], "bind ns/")
        _run(["mount", "--make-private", str(ns_dir)], "make ns/ private")
    target = spec.mount_ns(node)
    target.touch()
    _run(
        ["unshare", f"--mount={target}", "--propagation", "private", "true"],
        f"mount namespace of {node.name}",
    )
    _run(
        ["nsenter", f"--mount={target}", f"--net={NETNS_DIR / node.netns}", "--", "sh", "-s"],
        f"mounts of {node.name}",
        stdin=config.mount_setup_script(spec, node),
    )


def _ctr(mount_ns: Path, netns: Path, *args: str) -> list[str]:
    """ctr against a node's containerd (its socket is in the node's own /run)."""
    enter = ["nsenter", f"--mount={mount_ns}", f"--net={netns}", "--"]
    return [*enter, "ctr", "--address", config.CONTAINERD_SOCKET, "--namespace", "k8s.io", *args]


def _succeeds(argv: Sequence[str]) -> bool:
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _start_node(spec: ClusterSpec, node: NodeSpec, images: Sequence[Path]) -> None:
    _make_mount_namespace(spec, node)
    mount_ns = spec.mount_ns(node)
    _start(
        spec,
        f"containerd-{node.name}",
        config.containerd_argv(spec, node),
        netns=node.netns,
        mount_ns=mount_ns,
    )
    _wait(
        spec,
        f"containerd of {node.name}",
        lambda: _succeeds(_ctr(mount_ns, NETNS_DIR / node.netns, "version")),
        [f"containerd-{node.name}"],
        _STEP_TIMEOUT_S,
    )
    for image in images:
        _run(
            _ctr(mount_ns, NETNS_DIR / node.netns, "images", "import", str(image)),
            f"import {image.name}",
        )
    _start(
        spec,
        f"kubelet-{node.name}",
        config.kubelet_argv(spec, node),
        netns=node.netns,
        mount_ns=mount_ns,
    )
    _start(
        spec,
        f"kube-proxy-{node.name}",
        config.kube_proxy_argv(spec, node),
        netns=node.netns,
        mount_ns=mount_ns,
    )


def _ready_nodes(cluster: Cluster) -> set[str]:
    got = cluster.kubectl("get", "nodes", "-o", "json", timeout=10)
    if got.returncode != 0:
        return set()
    ready = set()
    for item in json.loads(got.stdout)["items"]:
        conditions = item["status"].get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            ready.add(item["metadata"]["name"])
    return ready


def memory_bytes(spec: ClusterSpec) -> tuple[int, int, int]:
    """Proportional set size of the cluster's processes: total, anonymous part, process count.

    The rest of the total is the binaries' pages, shared with the page cache.
    """
    pids = _cgroup_pids(spec.name)
    fields = {"Pss": 0, "Pss_Anon": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in fields:
                    fields[key] += int(value.split()[0]) * 1024
    return fields["Pss"], fields["Pss_Anon"], len(pids)


def _save_state(state_dir: Path, state: dict[str, Any]) -> None:
    _write(state_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _images(spec: ClusterSpec) -> list[Path]:
    """The images every node gets, as OCI archives: workloads, sandbox, cluster DNS."""
    directory = spec.state_dir / "images"
    directory.mkdir(exist_ok=True)
    busybox, pause, coredns = (directory / f"{n}.tar" for n in ("busybox", "pause", "coredns"))
    build_busybox_image(busybox, config.TEST_IMAGE)
    # The sandbox only has to hold the pod's namespaces open until it is killed.
    build_busybox_image(pause, config.SANDBOX_IMAGE, entrypoint=["/bin/sleep", "infinity"])
    build_busybox_image(
        coredns,
        config.COREDNS_IMAGE,
        entrypoint=["/bin/coredns"],
        files={"bin/coredns": spec.bin_dir / "coredns"},
    )
    return [busybox, pause, coredns]


def _start_control_plane(cluster: Cluster, listener: socket.socket) -> None:
    spec = cluster.spec
    netns = spec.control_plane_netns
    relay = [sys.executable, "-m", "testbed.k8s_cluster", "relay"]
    relay += [f"--listen-fd={listener.fileno()}", f"--netns={NETNS_DIR / netns}"]
    relay.append(f"--target={spec.control_plane_address}:{config.APISERVER_PORT}")
    _start(spec, "apiserver-relay", relay, netns=None, pass_fds=[listener.fileno()])
    _start(spec, "etcd", config.etcd_argv(spec), netns=netns)
    _start(spec, "kube-apiserver", config.apiserver_argv(spec), netns=netns)
    _wait(
        spec,
        "kube-apiserver",
        lambda: cluster.kubectl("get", "--raw", "/readyz", timeout=10).returncode == 0,
        ["etcd", "kube-apiserver", "apiserver-relay"],
        _START_TIMEOUT_S,
    )
    _start(spec, "kube-controller-manager", config.controller_manager_argv(spec), netns=netns)
    _start(spec, "kube-scheduler", config.scheduler_argv(spec), netns=netns)


def _wait_until_usable(cluster: Cluster) -> None:
    spec = cluster.spec
    want = {n.name for n in spec.nodes}
    _wait(
        spec,
        "nodes",
        lambda: _ready_nodes(cluster) >= want,
        [f"kubelet-{n.name}" for n in spec.nodes],
        _START_TIMEOUT_S,
    )
    # Pods are refused until the controller-manager has made this account.
    _wait(
        spec,
        "default ServiceAccount",
        lambda: cluster.kubectl("get", "serviceaccount", "default", timeout=10).returncode == 0,
        ["kube-controller-manager"],
        _START_TIMEOUT_S,
    )
    applied = cluster.kubectl("apply", "-f", "-", stdin=config.coredns_manifests())
    if applied.returncode != 0:
        raise ClusterError(f"cluster DNS manifests: {applied.stderr.strip()}")
    available = ["-n", "kube-system", "get", "deployment", "coredns"]
    available.append("-o=jsonpath={.status.availableReplicas}")
    _wait(
        spec,
        "cluster DNS (CoreDNS)",
        lambda: cluster.kubectl(*available, timeout=10).stdout == "1",
        [f"kubelet-{n.name}" for n in spec.nodes],
        _START_TIMEOUT_S,
    )


def up(state_dir: Path, node_count: int = 2, *, log: Log = _stderr) -> Cluster:
    """Start a cluster whose state lives in `state_dir`; on any failure remove all of it."""
    state_dir = state_dir.resolve()
    if (state_dir / STATE_FILE).exists():
        raise ClusterError(f"{state_dir} holds a cluster already: take it down first")
    if not 1 <= node_count <= 200:
        raise ClusterError(f"node count {node_count} is not between 1 and 200")
    started = time.monotonic()
    bin_dir = ensure_binaries()
    name = f"wk8s-{secrets.token_hex(3)}"
    _save_state(state_dir, {"name": name})
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        spec = config.cluster_spec(name, state_dir, bin_dir, node_count, listener.getsockname()[1])
        _make_network(spec)
        netns = [spec.underlay_netns, spec.control_plane_netns, *(n.netns for n in spec.nodes)]
        cluster = Cluster(spec, frozenset((NETNS_DIR / n).stat().st_ino for n in netns))
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        _write_files(spec)
        write_pki(spec)
        images = _images(spec)
        _make_cgroups(spec)
        _start_control_plane(cluster, listener)
        log(f"control plane up after {time.monotonic() - started:.1f} s")
        for node in spec.nodes:
            _start_node(spec, node, images)
        cluster = replace(
            cluster,
            namespaces=cluster.namespaces | {spec.mount_ns(n).stat().st_ino for n in spec.nodes},
        )
        _wait_until_usable(cluster)
        pss, anon, processes = memory_bytes(spec)
        log(
            f"started in {time.monotonic() - started:.1f} s; {processes} processes use "
            f"{pss / 2**20:.0f} MiB (PSS), {anon / 2**20:.0f} MiB of it anonymous"
        )
    except BaseException:
        try:
            down(state_dir, log=log)
        except ClusterError as e:
            log(f"cleanup after the failed start: {e.message}")
        raise
    finally:
        listener.close()
    return cluster


def import_image(state_dir: Path, archive: Path, *, log: Log = _stderr) -> None:
    """Import an OCI archive into the containerd (namespace k8s.io) of every node."""
    state_dir = state_dir.resolve()
    state_path = state_dir / STATE_FILE
    if not state_path.exists():
        raise ClusterError(f"no cluster in {state_dir} (no {STATE_FILE})")
    name = json.loads(state_path.read_text())["name"]
    for mount_ns in sorted((state_dir / "ns").iterdir()):
        netns = NETNS_DIR / f"{name}-{mount_ns.name}"
        _run(
            _ctr(mount_ns, netns, "images", "import", str(archive.resolve())),
            f"import {archive}",
            # About 30 s on a quiet machine; a busy one (a soak alongside) takes longer.
            timeout=_IMPORT_TIMEOUT_S,
        )
        log(f"imported {archive} into {mount_ns.name}")


# -- teardown -----------------------------------------------------------------


def _cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _hierarchies():
        root = hierarchy / name
        if not root.is_dir():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _kill_cgroups(name: str, timeout_s: float = 30.0) -> None:
    """SIGKILL everything in the cluster's cgroups until they are empty, then remove them.

    Killing by cgroup, not by pid file, also catches the shims and the
    containers, which no pid file names, and anything forked meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    while pids := _cgroup_pids(name):
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {sorted(pids)} in cgroup {name} would not die")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for hierarchy in _hierarchies():
        root = hierarchy / name
        if not root.is_dir():
            continue
        directories = [d for d in root.rglob("*") if d.is_dir()]
        for directory in [*sorted(directories, key=lambda d: len(d.parts), reverse=True), root]:
            # A cgroup whose last task just exited can stay busy for a moment.
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                raise ClusterError(f"cgroup {directory} could not be removed")


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory` in our mount namespace, newest first.

    Newest first (by mount id) unmounts stacked mounts top down and every
    mount before the one it sits on.
    """
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    inside = [
        (int(m[0]), m[4])
        for m in mounts
        if m[4] == str(directory) or m[4].startswith(f"{directory}/")
    ]
    return [point for _, point in sorted(inside, reverse=True)]


def _unmount_namespaces(state_dir: Path) -> None:
    """The nodes' mount namespace files and the private mount under them.

    Once no process and no bind mount holds a node's namespace, the kernel
    drops every mount made in it (overlays, the node's /run, pod volumes).
    """
    for point in _mounts_under(state_dir):
        _run(["umount", point], f"unmount {point}")


def down(state_dir: Path, *, log: Log = _stderr) -> None:
    """Remove everything the cluster in `state_dir` made; nothing to do if there is none."""
    state_dir = state_dir.resolve()
    state_path = state_dir / STATE_FILE
    if not state_path.exists():
        log(f"no cluster in {state_dir} (no {STATE_FILE})")
        return
    state = json.loads(state_path.read_text())
    failures: list[str] = []
    steps: list[tuple[str, Callable[[], object]]] = [
        ("processes and cgroups", lambda: _kill_cgroups(state["name"])),
        ("mount namespaces", lambda: _unmount_namespaces(state_dir)),
        ("network namespaces", lambda: _delete_network(state["name"])),
    ]
    for what, step in steps:
        try:
            step()
        except WeirError as e:
            failures.append(f"{what}: {e.message}")
    if failures:
        # The state stays, so that another `down` can finish the job.
        raise ClusterError("could not remove: " + "; ".join(failures))
    shutil.rmtree(state_dir)
    log(f"cluster {state['name']} removed")


def _namespace_inodes(pid: str) -> set[int]:
    inodes = set()
    for kind in ("net", "mnt"):
        with contextlib.suppress(OSError):
            inodes.add(Path(f"/proc/{pid}/ns/{kind}").stat().st_ino)
    return inodes


def leftovers(cluster: Cluster) -> list[str]:
    """Whatever of `cluster` is still on the machine; empty after a complete `down`."""
    spec = cluster.spec
    found = [f"netns {p.name}" for p in NETNS_DIR.glob(f"{spec.name}-*")]
    found += [f"cgroup {h / spec.name}" for h in _hierarchies() if (h / spec.name).exists()]
    if spec.state_dir.exists():
        found.append(f"directory {spec.state_dir}")
    found += [f"mount {m}" for m in _mounts_under(spec.state_dir)]
    marker = f"/{spec.name}/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # A zombie holds nothing but its pid until PID 1 reaps it.
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if (
                _namespace_inodes(proc.name) & cluster.namespaces
                or marker in (proc / "cgroup").read_text()
                or str(spec.state_dir) in cmdline
            ):
                found.append(f"process {proc.name}: {cmdline.strip()}")
    return found
