"""Assembly of the node agent: one place where the real parts are plugged together.

Start order is chosen so that the node is never worse off than before a
restart: capture already in pod netns is left alone, the proxy handoff comes
up before pods are re-checked, and the CNI socket (which makes the plugin
stop failing closed) opens last, once the agent can really enroll pods.
Shutdown closes the CNI socket first (new pods fail closed and are retried
by the runtime) and leaves capture in place: pods stay captured across agent
restarts and upgrades. The one exception is an uninstall on Kubernetes, told
apart from an upgrade by positive evidence from the API server
(node_agent/kubernetes/uninstall.py): then the node is left clean.

On Kubernetes (`kubernetes` given), the agent also follows this node's pods
and the namespaces' mesh labels (node_agent/kubernetes/): it enrolls meshed
pods that were running before it, unenrolls pods that leave the mesh, and
holds the ADD of a meshed pod the control plane has not pushed yet.

The long-lived parts (the config subscription, the proxy handoff's accept
loop, the CNI socket, the Kubernetes watches and reconcile loop) run under a
Supervisor: one that dies takes readiness down at once and is restarted;
one that keeps dying stops the agent with a failure, so that the DaemonSet
restarts it where an operator can see it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from kubernetes.client import CoreV1Api

from node_agent.admin.log_levels import AGENT_COMPONENTS
from node_agent.admin.server import AdminRegistry, HttpEndpoint, node_info
from node_agent.agent.cni_bridge import EnrollmentCniHandler
from node_agent.agent.cni_setup import CniSetup, CniSetupSettings
from node_agent.agent.metrics import AgentMetrics
from node_agent.agent.registrar import ControlPlaneRegistrar
from node_agent.cni_events.server import CniEventServer
from node_agent.constants import ADMIN_PORT, READINESS_PORT
from node_agent.controlplane_access import ControlPlaneEndpoint, TokenSource
from node_agent.controlplane_client import ControlPlaneClient
from node_agent.enrollment.enroller import CaptureEngine, Enroller, HostRules
from node_agent.enrollment.registry import PodRegistry
from node_agent.kubernetes.discovery import HostProc
from node_agent.kubernetes.follower import NAMESPACES, PODS, PodFollower
from node_agent.kubernetes.uninstall import NodeCleanup, UninstallCheck, shutdown
from node_agent.kubernetes.watch import ListWatch
from node_agent.mesh_view import MeshView
from node_agent.proxy_handoff.agent_side import ProxyHandoffServer
from node_agent.redirect.ebpf.pins import PinLayout
from weir_common.errors import NodeSetupError, WeirError
from weir_common.supervision import Supervisor

log = logging.getLogger(__name__)

# In the run dir; weir-cni's config names the same path (see CniSetupSettings).
CNI_SOCKET_NAME = "cni.sock"
# How often pods that vanished without a CNI DEL are looked for (see Enroller.prune).
DEPARTED_POD_SWEEP_S = 60.0


@dataclass(frozen=True)
class AgentSettings:
    node: str
    controlplane: ControlPlaneEndpoint
    token: str | TokenSource
    state_dir: Path
    run_dir: Path
    admin_host: str = "127.0.0.1"
    admin_port: int = ADMIN_PORT
    health_host: str = "0.0.0.0"  # noqa: S104 - kubelet probes readiness from outside the pod
    health_port: int = READINESS_PORT
    # None in local mode, where the node's conflist comes with the topology.
    cni_setup: CniSetupSettings | None = None
    # On Kubernetes: the agent's own pod (downward API), whose DaemonSet tells an
    # uninstall from an upgrade at shutdown; None keeps capture at every exit.
    pod_name: str | None = None
    pod_namespace: str | None = None
    # eBPF pins an uninstall removes, whatever the capture mode.
    bpf_pin_root: Path | None = None

    @property
    def cni_socket(self) -> Path:
        return self.run_dir / CNI_SOCKET_NAME

    @property
    def handoff_socket(self) -> Path:
        return self.run_dir / "proxy.sock"


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        capture: CaptureEngine,
        mode: str,
        *,
        kubernetes: CoreV1Api | None = None,
        host_rules: HostRules | None = None,
    ) -> None:
        # host_rules go into the agent's own netns (the node's); None leaves it untouched.
        self.settings = settings
        self.capture = capture
        self.registry = PodRegistry(settings.state_dir / "pods.json")
        self.mesh = MeshView(settings.node)
        self.follower: PodFollower | None = None
        self.watches: list[ListWatch] = []
        if kubernetes is not None:
            self.follower = PodFollower(settings.node, self.mesh, self.registry, HostProc())
            self.watches = [
                ListWatch(
                    PODS,
                    kubernetes.list_pod_for_all_namespaces,
                    self.follower,
                    field_selector=f"spec.nodeName={settings.node}",
                ),
                ListWatch(NAMESPACES, kubernetes.list_namespace, self.follower),
            ]
        self.uninstall_check: UninstallCheck | None = None
        if kubernetes is not None and settings.pod_name and settings.pod_namespace:
            self.uninstall_check = UninstallCheck(
                kubernetes, settings.pod_name, settings.pod_namespace
            )
            self.watches.append(self.uninstall_check.watch)
        elif kubernetes is not None:
            log.warning(
                "POD_NAME or POD_NAMESPACE not set: an uninstall will leave capture in place"
            )
        self.client = ControlPlaneClient(settings.controlplane, settings.node, settings.token)
        # A proxy that (re)connects gets every enrolled pod; once it holds them,
        # capture is re-checked, since eBPF steers to that proxy's own sockets.
        self.handoff = ProxyHandoffServer(
            settings.handoff_socket,
            lambda: self.enroller.enrolled(),  # noqa: PLW0108 - enroller is built next
            on_synced=self._converge_for_proxy,
        )
        # Proxies synced whose capture re-check has not finished: not ready meanwhile,
        # since eBPF still steers inbound connections to the old proxy's sockets.
        self._proxy_syncs_converging = 0
        self.registrar = ControlPlaneRegistrar(self.client)
        # Gauges are read at scrape time; the subscription is built below.
        self.metrics = AgentMetrics(
            pods_enrolled=lambda: sum(1 for record in self.registry if record.enrolled),
            xds_connected=lambda: self.subscription.connected.is_set(),  # noqa: PLW0108
            xds_nacks=lambda: self.subscription.nacks_sent,
        )
        self.enroller = Enroller(
            capture=capture,
            mode=mode,
            proxy=self.handoff,
            registrar=self.registrar,
            directory=self.mesh if self.follower is None else self.follower,
            registry=self.registry,
            host_rules=host_rules,
            metrics=self.metrics,
        )
        if self.follower is not None:
            self.follower.enroller = self.enroller
        self.subscription = self.client.subscribe(self.mesh)
        self.supervisor = Supervisor(self._give_up)
        self.failure: str | None = None
        self.admin = AdminRegistry(
            log_components=AGENT_COMPONENTS, on_quit=self.stop, metrics=self.metrics.render
        )
        self.admin.add_section("node", lambda: node_info(settings.node))
        self.admin.add_section("controlplane", self.subscription.dump)
        self.admin.add_section("pods", self.enroller.dump)
        self.admin.add_section("mesh", self.mesh.dump)
        self.admin.add_section("capture", lambda: {"mode": mode})
        self.admin.add_section("tasks", self.supervisor.dump)
        self.admin.add_section("proxies", self.handoff.dump)
        self.admin.add_readiness("tasks", self.supervisor.not_ready)
        # Ready means new pods can be enrolled: the socket opens only after the
        # pods of an earlier agent were converged (half-done ADDs undone).
        self._cni_serving = False
        self.admin.add_readiness(
            "cni socket", lambda: None if self._cni_serving else "not serving weir-cni yet"
        )
        # Not the stream being up: through a control-plane outage the node
        # serves on its last config ("degraded but serving"), and a stream
        # that is retrying is not a dead task ("tasks" covers that one). The
        # outage shows as weir_agent_xds_connected 0 and in config_dump.
        self.admin.add_readiness("proxy", self._proxy_ready)
        self.cni_setup = CniSetup(settings.cni_setup) if settings.cni_setup else None
        if self.cni_setup is not None:
            self.admin.add_readiness("cni", self.cni_setup.not_ready)
        self.admin.add_readiness("config", self._config_not_ready)
        if self.follower is not None:
            # Not in "pods": `weir node` reads that section as enrolled pods only.
            self.admin.add_section("kubernetes", self.follower.dump)
            self.admin.add_readiness("pod watch", self.follower.not_synced)
        self._stop = asyncio.Event()

    def _config_not_ready(self) -> str | None:
        if self.mesh.synced:
            return None
        # Before the first config, why the stream is down is what an operator needs
        # (a refused token says UNAUTHENTICATED here).
        why = self.subscription.not_connected()
        return "mesh config not received yet" + (f" ({why})" if why else "")

    def _proxy_ready(self) -> str | None:
        if not self.handoff.synced_proxies:
            return "no node proxy connected"
        if self._proxy_syncs_converging:
            return "re-checking capture for a newly synced node proxy"
        return None

    async def _converge_for_proxy(self) -> None:
        # Counted before the first await: the handoff marks the proxy synced and
        # calls this with no await in between, so readiness never sees the gap.
        self._proxy_syncs_converging += 1
        try:
            await self.enroller.converge()
        finally:
            self._proxy_syncs_converging -= 1

    def stop(self) -> None:
        self._stop.set()

    def _give_up(self, reason: str) -> None:
        log.critical("node agent stopping: %s", reason)
        self.failure = reason
        self.stop()

    async def run(self) -> int:
        """Serve until stopped; 0 after a requested stop, 1 after a failure."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self.registry.load()
        # Enrolled pods are registered again on every new xDS stream; after a
        # restart the registry file is the only memory of which pods those are.
        self.registrar.remember(record for record in self.registry if record.enrolled)
        endpoints = [
            HttpEndpoint(
                self.admin, self.settings.admin_host, self.settings.admin_port, admin=True
            ),
            HttpEndpoint(
                self.admin, self.settings.health_host, self.settings.health_port, admin=False
            ),
        ]
        for endpoint in endpoints:
            await endpoint.start()
        if self.cni_setup is not None:
            self.cni_setup.start()
        if self.follower is not None:
            self.follower.attach(loop)
            for watch in self.watches:
                self.supervisor.start(f"{watch.kind} watch", watch.run)
        await self.handoff.start(self.supervisor)
        await self.enroller.converge()
        # Only now: a new stream registers every remembered pod again, and one that
        # started during converge could re-register a pod converge just deregistered.
        self.supervisor.start("config subscription", self.subscription.run)
        self.supervisor.start("departed pod sweep", self._sweep_departed_pods)
        if self.follower is not None:
            self.supervisor.start("kubernetes reconcile", self.follower.run)
        cni_started = loop.create_future()
        self.supervisor.start("CNI socket", lambda: self._serve_cni(cni_started))
        try:
            # A socket that cannot be served at all (another agent has it) stops the agent.
            await cni_started
            log.info(
                "node agent for %s up: %d pods enrolled", self.settings.node, len(self.registry)
            )
            await self._stop.wait()
        finally:
            await self.supervisor.stop("CNI socket")
            if self.cni_setup is not None:
                await asyncio.to_thread(self.cni_setup.stop)
            # After the supervisor closed, nothing enrolls or re-applies capture.
            uninstall = await shutdown(self.uninstall_check, self.supervisor.close, self._cleanup)
            await self.handoff.close()
            for endpoint in endpoints:
                await endpoint.close()
            await self.client.__aexit__(None, None, None)
            log.info(
                "node agent for %s stopped; %s",
                self.settings.node,
                "Weir removed from the node" if uninstall else "pods stay captured",
            )
        return 0 if self.failure is None else 1

    def _cleanup(self) -> NodeCleanup:
        pins = self.settings.bpf_pin_root
        return NodeCleanup(
            registry=self.registry,
            capture=self.capture,
            proxy=self.handoff,
            cni=self.cni_setup,
            pins=PinLayout(pins) if pins is not None else None,
        )

    async def _sweep_departed_pods(self) -> None:
        while True:
            await asyncio.sleep(DEPARTED_POD_SWEEP_S)
            await self.enroller.prune()

    async def _serve_cni(self, started: asyncio.Future[None]) -> None:
        """Serve weir-cni until cancelled; raises if the socket stops serving on its own."""
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[str] = loop.create_future()

        def settle(why: str) -> None:
            if not failed.done():
                failed.set_result(why)

        def report(why: str) -> None:  # called on the server's accept thread
            loop.call_soon_threadsafe(settle, why)

        server = CniEventServer(
            self.settings.cni_socket,
            EnrollmentCniHandler(self.enroller, loop, self.mesh, gate=self.follower),
            on_failure=report,
        )
        try:
            await asyncio.to_thread(server.start)
        except WeirError as e:
            if not started.done():
                started.set_exception(e)
            raise
        if not started.done():
            started.set_result(None)
        self._cni_serving = True
        try:
            why = await failed
        finally:
            self._cni_serving = False
            await asyncio.to_thread(server.stop)
        raise NodeSetupError(f"CNI socket {self.settings.cni_socket} stopped serving: {why}")
