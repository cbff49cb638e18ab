"""Assembly of the node agent: one place where the real parts are plugged together.

Start order is chosen so that the node is never worse off than before a
restart: capture already in pod netns is left alone, the proxy handoff comes
up before pods are re-checked, and the CNI socket (which makes the plugin
stop failing closed) opens last, once the agent can really enroll pods.
Shutdown closes the CNI socket first (new pods fail closed and are retried
by the runtime) and never removes capture: pods stay captured across agent
restarts and upgrades.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from controlplane.client import ControlPlaneClient, ControlPlaneEndpoint
from node_agent.admin.server import AdminRegistry, HttpEndpoint
from node_agent.agent.cni_bridge import EnrollmentCniHandler
from node_agent.agent.cni_setup import CniSetup, CniSetupSettings
from node_agent.agent.registrar import ControlPlaneRegistrar
from node_agent.cni_events.server import CniEventServer
from node_agent.constants import ADMIN_PORT, READINESS_PORT
from node_agent.enrollment.enroller import CaptureEngine, Enroller
from node_agent.enrollment.registry import PodRegistry
from node_agent.mesh_view import MeshView
from node_agent.proxy_handoff.agent_side import ProxyHandoffServer

log = logging.getLogger(__name__)

# In the run dir; weir-cni's config names the same path (see CniSetupSettings).
CNI_SOCKET_NAME = "cni.sock"


@dataclass(frozen=True)
class AgentSettings:
    node: str
    controlplane: ControlPlaneEndpoint
    token: str
    state_dir: Path
    run_dir: Path
    admin_host: str = "127.0.0.1"
    admin_port: int = ADMIN_PORT
    health_host: str = "0.0.0.0"  # noqa: S104 - kubelet probes readiness from outside the pod
    health_port: int = READINESS_PORT
    # None in local mode, where the node's conflist comes with the topology.
    cni_setup: CniSetupSettings | None = None

    @property
    def cni_socket(self) -> Path:
        return self.run_dir / CNI_SOCKET_NAME

    @property
    def handoff_socket(self) -> Path:
        return self.run_dir / "proxy.sock"


class Agent:
    def __init__(self, settings: AgentSettings, capture: CaptureEngine, mode: str) -> None:
        self.settings = settings
        self.registry = PodRegistry(settings.state_dir / "pods.json")
        self.mesh = MeshView(settings.node)
        self.client = ControlPlaneClient(settings.controlplane, settings.node, settings.token)
        # A proxy that (re)connects gets every enrolled pod; once it holds them,
        # capture is re-checked, since eBPF steers to that proxy's own sockets.
        self.handoff = ProxyHandoffServer(
            settings.handoff_socket,
            lambda: self.enroller.enrolled(),  # noqa: PLW0108 - enroller is built next
            on_synced=lambda: self.enroller.converge(),  # noqa: PLW0108
        )
        self.enroller = Enroller(
            capture=capture,
            mode=mode,
            proxy=self.handoff,
            registrar=ControlPlaneRegistrar(self.client),
            directory=self.mesh,
            registry=self.registry,
        )
        self.admin = AdminRegistry()
        self.admin.add_section("pods", self.enroller.dump)
        self.admin.add_section("mesh", self.mesh.dump)
        self.admin.add_section("capture", lambda: {"mode": mode})
        self.admin.add_readiness("proxy", self._proxy_ready)
        self.cni_setup = CniSetup(settings.cni_setup) if settings.cni_setup else None
        if self.cni_setup is not None:
            self.admin.add_readiness("cni", self.cni_setup.not_ready)
        self.admin.add_readiness(
            "config", lambda: None if self.mesh.synced else "mesh config not received yet"
        )
        self._stop = asyncio.Event()

    def _proxy_ready(self) -> str | None:
        return None if self.handoff.synced_proxies else "no node proxy connected"

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self.registry.load()
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
        subscription = loop.create_task(self.client.subscribe(self.mesh).run())
        await self.handoff.start()
        await self.enroller.converge()
        cni = CniEventServer(
            self.settings.cni_socket, EnrollmentCniHandler(self.enroller, loop, self.mesh)
        )
        await asyncio.to_thread(cni.start)
        log.info("node agent for %s up: %d pods enrolled", self.settings.node, len(self.registry))
        try:
            await self._stop.wait()
        finally:
            await asyncio.to_thread(cni.stop)
            if self.cni_setup is not None:
                await asyncio.to_thread(self.cni_setup.stop)
            subscription.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await subscription
            await self.handoff.close()
            for endpoint in endpoints:
                await endpoint.close()
            await self.client.__aexit__(None, None, None)
            log.info("node agent for %s stopped; pods stay captured", self.settings.node)
