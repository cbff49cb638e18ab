"""The node proxy: pods in, listeners up, config and certificates kept current, and assembly.

`build()` is where real and fake parts meet: a ConfigSource (the xDS client,
or a static snapshot in tests), a CertificateProvider (the control plane CA,
or a local CA in tests) and a SocketFactory (netns sockets). `Proxy` wires
the data path: `Inbound` and `Outbound` get the collaborators they use (see
`state.py` and `connections.py`), never the `Proxy` itself. The node agent
drives the proxy through two calls only: `add_pod(netns, workload)` and
`remove_pod(uid)`; each either completes or raises, which is the ack the
agent's protocol sends back.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from node_agent import libc
from node_agent.constants import (
    INBOUND_PLAINTEXT_CAPTURE_PORT,
    INBOUND_TUNNEL_PORT,
    METRICS_PORT,
    OUTBOUND_CAPTURE_PORT,
)
from node_agent.netns import Netns
from node_agent.proxy.connections import ConnectionTasks, Refusals, UpstreamConnector
from node_agent.proxy.hbone import TcpPeer
from node_agent.proxy.http2.keepalive import KeepaliveSettings
from node_agent.proxy.identity import CertificateProvider, IdentityManager
from node_agent.proxy.inbound import Inbound, TunnelListener
from node_agent.proxy.model import MeshSnapshot, Workload
from node_agent.proxy.outbound import Outbound
from node_agent.proxy.pool import ConnectionPool
from node_agent.proxy.routing import Balancing, EndpointPicker
from node_agent.proxy.sockets import NetnsSocketFactory, SocketFactory
from node_agent.proxy.state import MeshView, PodState, TlsContexts
from node_agent.proxy.telemetry import (
    AccessLog,
    MetricsServer,
    MetricValues,
    ProxyMetrics,
    Telemetry,
)
from weir_common.errors import InvalidInputError, TransientError
from weir_common.log_limit import LogLimiter
from weir_common.mesh import SpiffeId
from weir_common.supervision import Supervisor

log = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS: Final = 1.0
# Python and OpenSSL free into glibc's heap, which keeps what a burst of
# traffic left behind: 3-5 MiB free after a bulk transfer here, more than a
# tenth of an idle proxy's memory. Given back when over this much, checked
# this often: mallinfo2 and malloc_trim took 0.8 and 1.7 ms on a heap with
# 15 MiB free in 13,000 pieces, about 0.05 % of a core at one check per 5 s.
MEMORY_RELEASE_INTERVAL_SECONDS: Final = 5.0
MEMORY_RELEASE_THRESHOLD_BYTES: Final = 1024 * 1024
# Between those checks glibc keeps what is freed, rather than giving the
# heap's top back at once and mapping each buffer over 128 KiB by itself:
# reads of 64-256 KiB come and go all the time, and a bulk transfer made 24
# brk(2) calls per MiB, each followed by page faults to grow the heap again.
# With this, none; in an A/B run of bulk transfers, the copies removed from
# the data path on the same day gained 15 % throughput with it and nothing
# without it.
HEAP_KEPT_BYTES: Final = 64 * 1024 * 1024
HEAP_MMAP_FROM_BYTES: Final = 4 * 1024 * 1024
# New objects the cyclic GC lets accumulate before a pass (CPython's default:
# 700). Connections are freed by reference counting once finished, so a pass
# finds the ones in flight, all alive: about 2,000 objects in the benchmark
# (32 new connections at a time). At 700 the outbound proxy made 190 passes
# in a 10-second request and new-connection run (2 % of its CPU, the longest
# 13 ms, a stall for every connection waiting); at this, none.
GC_YOUNG_THRESHOLD: Final = 10_000
# A dead peer proxy is found within 25 s of its last byte. A quiet pooled
# connection costs a PING every 15 s until its idle timeout closes it.
HBONE_KEEPALIVE: Final = KeepaliveSettings(interval=15.0, timeout=10.0)


def tune_collector() -> None:
    """Raise the cyclic GC's first threshold for the process (the older ones stay)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class ConfigSource(Protocol):
    async def run(self, apply: Callable[[MeshSnapshot], None]) -> None:
        """Call `apply` with each new snapshot (the first as soon as there is one); runs
        until cancelled."""
        ...


@dataclass(frozen=True)
class ProxySettings:
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    # An inbound HBONE connection with no stream for this long is closed (also
    # the fate of a client that completes TLS and then says nothing).
    tunnel_idle_timeout: float = 300.0
    pool_max_streams: int = 100
    pool_max_connections: int = 16
    pool_idle_timeout: float = 60.0
    balancing: Balancing = Balancing.ROUND_ROBIN
    endpoint_eject_seconds: float = 5.0
    # None: no metrics listener. Port 0 picks a free one (tests).
    metrics_address: tuple[str, int] | None = ("0.0.0.0", METRICS_PORT)  # noqa: S104
    # An extra /healthz/ready listener. None by default: the metrics port answers
    # it too, and READINESS_PORT is the node agent's (they share the pod netns).
    readiness_address: tuple[str, int] | None = None
    first_config_timeout: float = 30.0
    # A peer proxy heard nothing from for `interval` is sent a PING; one that
    # answers nothing within `timeout` is taken for dead (its machine or the
    # network gone, no FIN or RST coming): its connection is aborted, the
    # apps' connections through it reset, instead of hanging until TCP gives
    # up (about 15 minutes with data to send, never without).
    hbone_keepalive: KeepaliveSettings | None = HBONE_KEEPALIVE


class Proxy:
    """Assembly and lifecycle: owns pods, listeners, config, certificates and shutdown.

    Connections themselves are `Inbound`'s and `Outbound`'s; what they share
    with the proxy (the mesh view, TLS contexts, pool, tasks) is built here.
    """

    def __init__(
        self,
        settings: ProxySettings,
        *,
        config: ConfigSource,
        certificates: CertificateProvider,
        sockets: SocketFactory,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.metrics = telemetry.metrics
        self._telemetry = telemetry
        self.identities = IdentityManager(certificates, self._rotated, metrics=self.metrics)
        self.pool = ConnectionPool(
            max_streams=settings.pool_max_streams,
            max_connections=settings.pool_max_connections,
            idle_seconds=settings.pool_idle_timeout,
        )
        self.metrics_port: int | None = None
        self.readiness_port: int | None = None
        self._sockets = sockets
        self._config = config
        self._mesh = MeshView()
        self._first_snapshot = asyncio.Event()
        self._pods: dict[str, PodState] = {}
        self._tls = TlsContexts()
        self._tasks = ConnectionTasks()
        self._refusals = Refusals(self.metrics)
        # The config subscription, the idle-tunnel sweep and the agent handoff.
        self.supervisor = Supervisor(self._give_up)
        # Set when the proxy cannot go on; whoever runs it stops it and exits non-zero.
        self.failed = asyncio.Event()
        self.failure = ""
        # Whoever runs the proxy adds what else readiness waits for (the agent's pods).
        self.readiness_checks: list[Callable[[], str | None]] = []
        # The other workers' counters, which the first worker serves with its own (see workers).
        self.other_workers_metrics: Callable[[], Awaitable[Sequence[MetricValues]]] | None = None
        self._metrics_server = MetricsServer(self._render_metrics, lambda: self.ready)
        self._readiness_server = MetricsServer(self._render_metrics, lambda: self.ready)
        upstream = UpstreamConnector(
            sockets,
            connect_timeout=settings.connect_timeout,
            handshake_timeout=settings.handshake_timeout,
        )
        self._outbound = Outbound(
            mesh=self._mesh,
            tls=self._tls,
            pool=self.pool,
            picker=EndpointPicker(
                settings.balancing, eject_seconds=settings.endpoint_eject_seconds
            ),
            upstream=upstream,
            tasks=self._tasks,
            refusals=self._refusals,
            telemetry=telemetry,
            response_timeout=settings.connect_timeout,
            keepalive=settings.hbone_keepalive,
        )
        self._inbound = Inbound(
            mesh=self._mesh,
            tls=self._tls,
            upstream=upstream,
            tasks=self._tasks,
            refusals=self._refusals,
            telemetry=telemetry,
            handshake_timeout=settings.handshake_timeout,
            keepalive=settings.hbone_keepalive,
        )
        self._accepting = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to config (waiting for a first snapshot) and serve metrics."""
        self.supervisor.start("config subscription", lambda: self._config.run(self.apply_snapshot))
        try:
            async with asyncio.timeout(self.settings.first_config_timeout):
                await self._first_snapshot.wait()
        except TimeoutError:
            await self.supervisor.close()
            raise TransientError(
                f"no mesh config within {self.settings.first_config_timeout:.0f} s"
            ) from None
        self.supervisor.start("idle tunnel sweep", self._sweep_idle_tunnels)
        tune_collector()
        if libc.keep_freed_heap(trim_above=HEAP_KEPT_BYTES, mmap_from=HEAP_MMAP_FROM_BYTES):
            self.supervisor.start("freed memory release", self._release_freed_memory)
        # reuse_port: on Kubernetes the proxy runs on the host network and its
        # successor starts beside it (maxSurge), so both hold these ports for a
        # while; the kubelet's probe may then reach either one.
        if self.settings.metrics_address is not None:
            host, port = self.settings.metrics_address
            self.metrics_port = await self._metrics_server.start(host, port, reuse_port=True)
        if self.settings.readiness_address is not None:
            host, port = self.settings.readiness_address
            self.readiness_port = await self._readiness_server.start(host, port, reuse_port=True)
        self._accepting = True

    @property
    def ready(self) -> bool:
        return self.not_ready() is None

    def not_ready(self) -> str | None:
        """Why the proxy is not ready, or None. The metrics port's /healthz/ready says this."""
        if not self._accepting:
            return "not accepting pods (starting or shutting down)"
        for check in self.readiness_checks:
            reason = check()
            if reason is not None:
                return reason
        return self.supervisor.not_ready()

    async def _render_metrics(self) -> str:
        return self.metrics.render(await self._others_metrics())

    async def _traffic(self) -> list[dict[str, Any]]:
        return self.metrics.traffic(await self._others_metrics())

    async def _others_metrics(self) -> Sequence[MetricValues]:
        gather = self.other_workers_metrics
        return () if gather is None else await gather()

    def _give_up(self, reason: str) -> None:
        log.critical("proxy stopping: %s", reason)
        self.failure = reason
        self.failed.set()

    async def shutdown(self, deadline: float) -> None:
        """Stop accepting, let connections finish for up to `deadline` seconds, then close.

        Peers are told (GOAWAY) to open no new streams on our connections; the
        streams they have go on until they end or the deadline passes.
        """
        self._accepting = False
        for pod in self._pods.values():
            for server in pod.servers:
                server.close()
            for conn in pod.tunnels:
                conn.shutdown()
        self.pool.retire(lambda _key: True)
        await self._tasks.drain(deadline)
        for pod in list(self._pods.values()):
            for conn in list(pod.tunnels):
                conn.close("proxy shutting down")
        self.pool.close_all()
        self._pods.clear()
        await self.identities.close()
        await self._metrics_server.close()
        await self._readiness_server.close()
        await self.supervisor.close()
        # Last: the connections cut above have logged their lines by now. It
        # blocks the loop only while a stalled reader holds the last write, and
        # then for 2 s at most; nothing else runs on the loop any more.
        self._telemetry.access_log.close()

    # -- config and certificates -------------------------------------------------

    @property
    def snapshot(self) -> MeshSnapshot:
        return self._mesh.snapshot

    @property
    def refusal_log(self) -> LogLimiter:
        """How often refusals and denials are logged; a new one starts every kind afresh."""
        return self._refusals.limiter

    @refusal_log.setter
    def refusal_log(self, limiter: LogLimiter) -> None:
        self._refusals.limiter = limiter

    def apply_snapshot(self, snapshot: MeshSnapshot) -> None:
        old = self._mesh.replace(snapshot)
        self._first_snapshot.set()
        if old is not None and old.trust_bundle_pem != snapshot.trust_bundle_pem:
            log.info("trust bundle changed: rebuilding TLS contexts")
            for identity in {p.identity for p in self._pods.values()}:
                self._rebuild_tls(identity)

    def _rotated(self, identity: SpiffeId) -> None:
        self._rebuild_tls(identity)

    def _rebuild_tls(self, identity: SpiffeId) -> None:
        """New handshakes use the new contexts; open connections keep theirs until idle."""
        cert = self.identities.current(identity)
        if cert is None:
            return
        gen = self._tls.install(identity, cert, self.snapshot.trust_bundle_pem)
        self.pool.retire(
            lambda key: (
                isinstance(key, tuple)
                and key[-1] != gen
                and any(p.uid == key[0] and p.identity == identity for p in self._pods.values())
            )
        )

    # -- pods (the node agent's interface) -------------------------------------------

    async def add_pod(self, netns: Netns, workload: Workload) -> None:
        """Serve `workload`'s pod: certificate ready, listeners open inside `netns`.

        Idempotent for the same pod and netns. On failure nothing of this pod
        is left open and the error says whether retrying can help.
        """
        if not self._accepting:
            raise TransientError("proxy is not accepting pods (starting or shutting down)")
        existing = self._pods.get(workload.uid)
        if existing is not None:
            if existing.netns.inode == netns.inode and existing.workload == workload:
                return
            await self.remove_pod(workload.uid)
        if not workload.ips:
            raise InvalidInputError(f"pod {workload.key} has no IP address")
        identity = workload.identity(self.snapshot.trust_domain)
        try:
            await self.identities.acquire(identity)
        except Exception as e:
            raise TransientError(f"no certificate for {identity}: {e}") from e
        pod = PodState(netns, workload, identity)
        try:
            if identity not in self._tls:
                self._rebuild_tls(identity)
            await self._open_listeners(pod)
        except BaseException:
            for server in pod.servers:
                server.close()
            self._sockets.forget(netns)
            self.identities.release(identity)
            raise
        self._pods[workload.uid] = pod
        log.info("serving pod %s (%s) in %s", workload.key, identity, netns.path)

    def pod(self, uid: str) -> PodState | None:
        """What the proxy holds for a pod it serves."""
        return self._pods.get(uid)

    async def remove_pod(self, uid: str) -> None:
        """Stop serving a pod: listeners closed, tunnels told to go away, certificate released.

        Connections already carried go on until they end (the pod's netns
        going away ends them). Removing an unknown pod is not an error.
        """
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        for server in pod.servers:
            server.close()
        self._sockets.forget(pod.netns)
        for conn in pod.tunnels:
            conn.shutdown()
        self.pool.retire(lambda key: isinstance(key, tuple) and key[0] == uid)
        if not any(p.identity == pod.identity for p in self._pods.values()):
            self._tls.discard(pod.identity)
        self.identities.release(pod.identity)
        log.info("stopped serving pod %s", pod.workload.key)

    async def _open_listeners(self, pod: PodState) -> None:
        loop = asyncio.get_running_loop()
        families = sorted(
            {socket.AF_INET6 if ":" in ip else socket.AF_INET for ip in pod.workload.ips}
        )
        for family in families:
            plain: list[tuple[int, Callable[[TcpPeer], None]]] = [
                (OUTBOUND_CAPTURE_PORT, functools.partial(self._outbound.accepted, pod, family)),
                (
                    INBOUND_PLAINTEXT_CAPTURE_PORT,
                    functools.partial(self._inbound.plaintext_accepted, pod, family),
                ),
            ]
            for port, accepted in plain:
                sock = self._listener(pod, family, port)
                try:
                    server = await loop.create_server(
                        functools.partial(TcpPeer, accepted), sock=sock
                    )
                except BaseException:
                    sock.close()
                    raise
                pod.servers.append(server)
            tunnel = self._listener(pod, family, INBOUND_TUNNEL_PORT)
            pod.servers.append(TunnelListener(self._inbound, pod, tunnel))

    def _listener(self, pod: PodState, family: socket.AddressFamily, port: int) -> socket.socket:
        try:
            return self._sockets.listener(pod.netns, family, port)
        except OSError as e:
            # EADDRINUSE is the usual one: another proxy (a rollout overlap) or
            # the app itself holds the port. It may go away, so retrying can help.
            ip = "IPv6" if family == socket.AF_INET6 else "IPv4"
            raise TransientError(
                f"cannot listen on {ip} port {port} in the netns of pod {pod.workload.key}: "
                f"{e.strerror or e}"
            ) from e

    # -- background -------------------------------------------------------------

    async def _release_freed_memory(self) -> None:
        while True:
            await asyncio.sleep(MEMORY_RELEASE_INTERVAL_SECONDS)
            free = libc.heap_free_bytes()
            if free is not None and free > MEMORY_RELEASE_THRESHOLD_BYTES:
                libc.release_free_heap()

    async def _sweep_idle_tunnels(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
            cutoff = time.monotonic() - self.settings.tunnel_idle_timeout
            for pod in list(self._pods.values()):
                for conn in list(pod.tunnels):
                    if not conn.streams and conn.last_active < cutoff:
                        conn.close("idle")

    # -- operator surface ---------------------------------------------------------

    def admin_sections(self) -> dict[str, Callable[[], Any]]:
        """The config_dump sections of the proxy's admin listener, each read live."""
        return {
            "pods": self._dump_pods,
            "snapshot": self._dump_snapshot,
            "mesh": self._mesh.dump,
            "certificates": self.identities.dump,
            "connections": self._telemetry.live,
            "traffic": self._traffic,
            "pool": self.pool.dump,
            "tasks": self.supervisor.dump,
        }

    def _dump_pods(self) -> dict[str, dict[str, Any]]:
        return {
            uid: {
                "workload": pod.workload.key,
                "identity": str(pod.identity),
                "ips": list(pod.workload.ips),
                "netns": str(pod.netns.path),
                "listeners": len(pod.servers),
                "inbound_tunnels": len(pod.tunnels),
            }
            for uid, pod in sorted(self._pods.items())
        }

    def _dump_snapshot(self) -> dict[str, Any] | None:
        """What config is in force, in numbers; the whole of it is the `mesh` section."""
        snapshot = self._mesh.snapshot if self._first_snapshot.is_set() else None
        if snapshot is None:
            return None
        return {
            "trust_domain": snapshot.trust_domain,
            "trust_bundle_roots": len(snapshot.trust_bundle_pem),
            "workloads": len(snapshot.workloads),
            "services": len(snapshot.services),
            "policies": len(snapshot.policies),
        }

    def dump(self) -> dict[str, Any]:
        """This proxy's section of config_dump: plain data only."""
        return {
            "ready": self.ready,
            "pods": {
                uid: {
                    "workload": pod.workload.key,
                    "identity": str(pod.identity),
                    "netns": str(pod.netns.path),
                    "inbound_tunnels": len(pod.tunnels),
                }
                for uid, pod in sorted(self._pods.items())
            },
            "certificates": self.identities.dump(),
            "pool": self.pool.dump(),
            "active_connections": len(self._tasks),
            "mesh": self._mesh.dump(),
        }


def build(
    settings: ProxySettings,
    *,
    config: ConfigSource,
    certificates: CertificateProvider,
    sockets: SocketFactory | None = None,
    access_log: AccessLog | None = None,
) -> Proxy:
    """The one place a proxy is put together; call `start()` on the result."""
    return Proxy(
        settings,
        config=config,
        certificates=certificates,
        sockets=sockets or NetnsSocketFactory(),
        telemetry=Telemetry(ProxyMetrics(), access_log or AccessLog()),
    )
