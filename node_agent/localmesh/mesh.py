"""The local mesh: a control plane and, per node, a node agent and a proxy, as processes.

Everything runs as it would on real nodes, only in network namespaces: the
control plane listens in the underlay (TLS, its own CA), each agent and proxy
run inside their node's netns, and pods are created by running the node's
CNI chain (bridge, host-local, then the frozen weir-cni) exactly as a
container runtime does. What a node's proxy is comes from the caller, so the
same harness serves the real `weir proxy` and test stand-ins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from node_agent import netns as netns_mod
from node_agent.cni_install.conflist import PluginSettings
from node_agent.cni_install.installer import install_plugin_binary
from node_agent.constants import PROXY_UID
from node_agent.localmesh.topology import CNI_BIN_DIR, LocalTopology, Node, Pod
from node_agent.netns import Netns
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.pins import BPFFS, PinLayout
from weir_common.errors import NodeSetupError, TransientError
from weir_common.retry import Backoff

CONTROLPLANE_GRPC_PORT = 15012
CONTROLPLANE_HTTP_PORT = 15014
REPO = Path(__file__).resolve().parents[2]
PLUGIN_BUNDLE = REPO / "build" / "cni-plugin" / "weir-cni"
_STARTUP_TIMEOUT_S = 30.0
_PROXY_RESTART_BACKOFF = Backoff(initial=0.2, maximum=5.0)
# A proxy that ran this long before dying starts again at the first backoff step.
_PROXY_STABLE_S = 10.0

log = logging.getLogger(__name__)


def weir_command() -> list[str]:
    """How to run `weir` from this environment (the venv's console script)."""
    return [str(Path(sys.executable).with_name("weir"))]


@dataclass
class Process:
    """A child process started inside a netns, with its output in a log file."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill looks like to everyone else."""
        self.popen.kill()
        self.popen.wait()

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def spawn(ns: Netns, name: str, argv: Sequence[str], log_dir: Path) -> Process:
    log = log_dir / f"{name}.log"
    out: IO[bytes]
    with log.open("ab") as out, netns_mod.entered(ns):
        popen = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Process(name, list(argv), popen, log)


def http_get(
    ns: Netns, host: str, port: int, path: str, timeout_s: float = 2.0
) -> tuple[int, bytes]:
    """One GET from inside `ns`; raises OSError when nothing answers."""
    with netns_mod.entered(ns):
        sock = socket.create_connection((host, port), timeout=timeout_s)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def wait_http_ok(
    ns: Netns,
    address: tuple[str, int],
    path: str,
    *,
    process: Process,
    timeout_s: float = _STARTUP_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise NodeSetupError(
                f"{process.name} exited ({process.popen.returncode}):\n{process.tail()}"
            )
        try:
            status, body = http_get(ns, *address, path)
        except OSError as e:
            last = str(e)
        else:
            if status == 200:
                return
            last = f"{status} {body[:300]!r}"
        time.sleep(0.1)
    raise TransientError(
        f"{process.name} not ready at {path} after {timeout_s:.0f}s: {last}\n{process.tail()}"
    )


# Starts a node's proxy once its agent runs; returns how to stop it.
ProxyStarter = Callable[["LocalMesh", "MeshNode"], Callable[[], object]]


@dataclass
class MeshNode:
    node: Node
    dir: Path
    # Where the agent pins eBPF capture if it runs in that mode (WEIR_REDIRECT_MODE):
    # the node's own, as on a real node, so teardown removes exactly this node's.
    pins: PinLayout
    agent: Process | None = None
    proxy: Process | None = None  # the current one, when the real proxy runs
    proxy_keeper: KeptProcess | None = None
    stop_proxy: Callable[[], object] | None = None

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def handoff_socket(self) -> Path:
        return self.run_dir / "proxy.sock"

    @property
    def cni_socket(self) -> Path:
        return self.run_dir / "cni.sock"


@dataclass
class LocalMesh:
    config: Path
    start_proxy: ProxyStarter
    topology: LocalTopology = field(default_factory=LocalTopology)
    nodes: dict[str, MeshNode] = field(default_factory=dict)
    controlplane: Process | None = None
    # How long a stopping proxy lets its connections go on (`--drain-seconds`).
    proxy_drain_seconds: float = 1.0
    # Processes per node proxy (`--workers`).
    proxy_workers: int = 1
    _work: Path | None = None

    def __enter__(self) -> LocalMesh:
        self._config_doc: dict[str, Any] = yaml.safe_load(self.config.read_text())
        self.topology.open()
        try:
            self._start_controlplane()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def work(self) -> Path:
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix=f"{self.topology.prefix}-mesh-"))
            # The proxy runs as UID 1337 and must reach its node's handoff socket.
            self._work.chmod(0o755)
        return self._work

    @property
    def controlplane_address(self) -> str:
        return f"{self.topology.router_v4}:{CONTROLPLANE_GRPC_PORT}"

    @property
    def mesh_root(self) -> Path:
        return self.work / "controlplane" / "root-cert.pem"

    def _start_controlplane(self) -> None:
        host = str(self.topology.router_v4)
        self.controlplane = spawn(
            self.topology.underlay,
            "controlplane",
            [
                *weir_command(),
                "controlplane",
                "--config",
                str(self.config),
                "--listen",
                self.controlplane_address,
                "--http-listen",
                f"{host}:{CONTROLPLANE_HTTP_PORT}",
                "--state-dir",
                str(self.work / "controlplane"),
            ],
            self.work,
        )
        wait_http_ok(
            self.topology.underlay,
            (host, CONTROLPLANE_HTTP_PORT),
            "/healthz/ready",
            process=self.controlplane,
        )

    def restart_controlplane(self) -> None:
        """Stop the control plane and start it again: it forgets every registration,
        keeps its root (the state dir), and nodes must bring their pods back."""
        if self.controlplane is not None:
            self.controlplane.stop()
        self._start_controlplane()

    def stop_controlplane(self) -> None:
        """An outage: the control plane exits and its port refuses connections."""
        if self.controlplane is not None:
            self.controlplane.stop()
            self.controlplane = None

    def start_controlplane(self) -> None:
        """The control plane back after stop_controlplane, with its root and no
        registrations; returns once it reports ready."""
        if self.controlplane is not None and self.controlplane.popen.poll() is None:
            raise NodeSetupError("the control plane is already running")
        self._start_controlplane()

    def _token(self, node: str) -> str:
        for entry in self._config_doc.get("nodes", []):
            if entry.get("name") == node:
                return str(entry["bootstrapToken"])
        raise NodeSetupError(f"node {node} is not in {self.config}")

    def add_node(self, name: str, pod_cidr_v4: str, pod_cidr_v6: str | None = None) -> MeshNode:
        node_dir = self.work / name
        (node_dir / "run").mkdir(parents=True)
        bin_dir = self.work / "cni-bin"
        if not (bin_dir / "weir-cni").exists():
            if not (PLUGIN_BUNDLE / "weir-cni").exists():
                raise NodeSetupError(
                    f"{PLUGIN_BUNDLE} missing: build it with scripts/build-cni-plugin.sh"
                )
            bin_dir.mkdir(exist_ok=True)
            install_plugin_binary(PLUGIN_BUNDLE, bin_dir)
            self.topology.cni_path = [CNI_BIN_DIR, bin_dir]
        weir = PluginSettings(agent_socket=str(node_dir / "run" / "cni.sock"), agent_timeout_s=10)
        node = self.topology.add_node(
            name, pod_cidr_v4, pod_cidr_v6, chained_plugins=[weir.entry()]
        )
        mesh_node = MeshNode(node, node_dir, PinLayout(BPFFS / f"{self.topology.prefix}-{name}"))
        self.nodes[name] = mesh_node
        token_file = node_dir / "token"
        token_file.write_text(self._token(name))
        token_file.chmod(0o600)
        mesh_node.agent = spawn(
            node.netns,
            f"agent-{name}",
            [
                *weir_command(),
                "--log-level",
                "info",
                "agent",
                "--node",
                name,
                "--controlplane",
                self.controlplane_address,
                "--controlplane-ca",
                str(self.mesh_root),
                "--token-file",
                str(token_file),
                "--state-dir",
                str(node_dir / "state"),
                "--run-dir",
                str(node_dir / "run"),
                "--bpf-pin-root",
                str(mesh_node.pins.root),
            ],
            self.work,
        )
        mesh_node.stop_proxy = self.start_proxy(self, mesh_node)
        wait_http_ok(node.netns, ("127.0.0.1", 15021), "/healthz/ready", process=mesh_node.agent)
        return mesh_node

    def restart_agent(self, name: str, *, kill: bool = False) -> None:
        mesh_node = self.nodes[name]
        assert mesh_node.agent is not None
        if kill:
            mesh_node.agent.kill()
        else:
            mesh_node.agent.stop()
        mesh_node.agent = spawn(
            mesh_node.node.netns, f"agent-{name}", mesh_node.agent.argv, self.work
        )

    def wait_agent_ready(self, name: str) -> None:
        mesh_node = self.nodes[name]
        assert mesh_node.agent is not None
        wait_http_ok(
            mesh_node.node.netns, ("127.0.0.1", 15021), "/healthz/ready", process=mesh_node.agent
        )

    def upgrade_proxy(self, name: str, timeout_s: float = _STARTUP_TIMEOUT_S) -> Process:
        """A rolling update of the node's proxy with surge: see KeptProcess.upgrade."""
        mesh_node = self.nodes[name]
        if mesh_node.proxy_keeper is None:
            raise NodeSetupError(f"node {name} does not run a kept proxy")

        def connected(successor: Process) -> bool:
            status, body = http_get(
                mesh_node.node.netns, "127.0.0.1", 15000, "/config_dump?section=proxies"
            )
            pids = {p["pid"] for p in json.loads(body)["proxies"]} if status == 200 else set()
            return successor.popen.pid in pids

        return mesh_node.proxy_keeper.upgrade(connected, timeout_s)

    def add_pod(self, node: str, name: str, namespace: str = "default") -> Pod:
        return self.topology.add_pod(self.nodes[node].node, name, namespace)

    def close(self) -> None:
        try:
            for mesh_node in self.nodes.values():
                if mesh_node.stop_proxy is not None:
                    mesh_node.stop_proxy()
            # Pods go first, while agents still answer their CNI DEL.
            for pod in reversed(self.topology.pods):
                with contextlib.suppress(Exception):
                    self.topology.remove_pod(pod)
            for mesh_node in self.nodes.values():
                if mesh_node.agent is not None:
                    mesh_node.agent.stop()
            if self.controlplane is not None:
                self.controlplane.stop()
        finally:
            try:
                # Pinned programs stay attached at the cgroup root after their agent exits.
                for mesh_node in self.nodes.values():
                    loader.uninstall(mesh_node.pins)
            finally:
                self.topology.close()
                if self._work is not None:
                    subprocess.run(["rm", "-rf", str(self._work)], check=False)
                    self._work = None


class KeptProcess:
    """A node's proxy kept running, as the kubelet keeps a DaemonSet's pod running.

    A proxy that exits on its own (a crash, kill -9, an OOM kill) is started
    again after a backoff. `upgrade` starts the successor beside the running
    one and stops the old one only once the successor is connected to the
    agent, as a DaemonSet's rolling update with maxSurge does; the old one
    then hands over and drains on its own.
    """

    def __init__(
        self,
        start: Callable[[], Process],
        on_change: Callable[[Process], object],
        backoff: Backoff = _PROXY_RESTART_BACKOFF,
    ) -> None:
        self._start = start
        self._on_change = on_change
        self._backoff = backoff
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._paused = False
        self.current = start()
        self._started = time.monotonic()
        on_change(self.current)
        self.restarts = 0
        self.retired: list[Process] = []
        self._watcher = threading.Thread(target=self._watch, name="proxy keeper", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.wait(0.1):
            with self._lock:
                died = self.current
            if died.popen.poll() is None:
                continue
            if time.monotonic() - self._started > _PROXY_STABLE_S:
                failures = 0
            log.warning("%s exited (%s); starting it again", died.name, died.popen.returncode)
            if self._stopping.wait(self._backoff.delay(failures)):
                return
            failures += 1
            with self._lock:
                if self._stopping.is_set() or self._paused or self.current is not died:
                    continue
                self.current = self._start()
                self._started = time.monotonic()
                self.restarts += 1
                self._on_change(self.current)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No restarts inside the block (to look at a node whose proxy is down)."""
        with self._lock:
            self._paused = True
        try:
            yield
        finally:
            with self._lock:
                self._paused = False

    def kill(self) -> Process:
        """kill -9 of the running process (a crash); it is started again."""
        with self._lock:
            victim = self.current
        victim.popen.kill()
        victim.popen.wait()
        return victim

    def upgrade(self, connected: Callable[[Process], bool], timeout_s: float) -> Process:
        """Start a successor, wait until `connected(successor)`, then SIGTERM the old one."""
        with self._lock:
            old = self.current
            new = self._start()
            self.current = new
            self._on_change(new)
        deadline = time.monotonic() + timeout_s
        while not self._connected(connected, new):
            if new.popen.poll() is not None:
                raise NodeSetupError(f"successor {new.name} exited:\n{new.tail()}")
            if time.monotonic() > deadline:
                raise TransientError(f"successor {new.name} not connected after {timeout_s:.0f}s")
            time.sleep(0.05)
        if old.popen.poll() is None:
            old.popen.send_signal(signal.SIGTERM)
        self.retired.append(old)
        return new

    @staticmethod
    def _connected(connected: Callable[[Process], bool], process: Process) -> bool:
        try:
            return connected(process)
        except OSError:
            return False

    def wait_retired(self, timeout_s: float) -> list[int | None]:
        """Exit codes of the upgraded-away processes (None: still draining after the timeout)."""
        deadline = time.monotonic() + timeout_s
        for process in self.retired:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(max(0.0, deadline - time.monotonic()))
        return [p.popen.poll() for p in self.retired]

    def stop(self) -> int:
        self._stopping.set()
        self._watcher.join()
        for process in self.retired:
            process.stop()
        return self.current.stop()


def real_proxy(mesh: LocalMesh, node: MeshNode) -> Callable[[], object]:
    """The real `weir proxy run`, in the node's netns, as UID 1337, following its agent.

    Kept running (see KeptProcess): restarted when it dies, upgradable in place.
    """

    def start() -> Process:
        return _spawn_proxy(mesh, node)

    def current(process: Process) -> None:
        node.proxy = process

    node.proxy_keeper = KeptProcess(start, current)
    return node.proxy_keeper.stop


def _spawn_proxy(mesh: LocalMesh, node: MeshNode) -> Process:
    return spawn(
        node.node.netns,
        f"proxy-{node.node.name}",
        [
            *weir_command(),
            "--log-level",
            "info",
            "proxy",
            "run",
            "--control-plane",
            mesh.controlplane_address,
            "--control-plane-roots",
            str(mesh.mesh_root),
            "--node",
            node.node.name,
            "--token-file",
            str(node.dir / "token"),
            "--agent-socket",
            str(node.handoff_socket),
            "--metrics-listen",
            "127.0.0.1:15020",
            "--drop-to-uid",
            str(PROXY_UID),
            "--drain-seconds",
            str(mesh.proxy_drain_seconds),
            "--workers",
            str(mesh.proxy_workers),
        ],
        mesh.work,
    )
