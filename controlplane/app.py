"""Assembly: one place where the source, CA, authenticator and servers meet.

Tests plug in their own source, CA or authenticator here; the CLI plugs in
the file source and the persisted root, or in Kubernetes mode the
Kubernetes source, the root from Secret weir-ca and the TokenReview
authenticator.
"""

import asyncio
import datetime
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc

from controlplane import metrics as m
from controlplane.auth import BootstrapTokenAuthenticator, NodeAuthenticator
from controlplane.ca import CertificateAuthority
from controlplane.mesh import MeshConfig
from controlplane.services import CertificateService, RegistryService
from controlplane.serving_tls import DEFAULT_SERVING_TTL, ServingCertificate, default_names
from controlplane.sources import ConfigSource
from controlplane.state import MeshState
from controlplane.xds_server import MAX_MESSAGE_BYTES, DistributionServer
from weir_common import http_endpoint
from weir_common._generated.weir.v1 import ca_pb2_grpc, registry_pb2_grpc
from weir_common.errors import NodeSetupError
from weir_common.supervision import Supervisor

log = logging.getLogger(__name__)

# gRPC over TLS (xDS, CA, registry). istiod's TLS xDS port, so operators recognize it.
DEFAULT_GRPC_LISTEN: Final = "127.0.0.1:15012"
# HTTP: /healthz, /healthz/ready, /metrics, /debug/config_dump. Loopback only by default.
DEFAULT_HTTP_LISTEN: Final = "127.0.0.1:15014"
GRPC_OPTIONS: Final = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # The nodes' clients ping every 30 s (node_agent's KEEPALIVE_SECONDS), also
    # between calls; without this, such PINGs count as abuse and end in GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_concurrent_streams", 10_000),
    # gRPC cancels a call the application has not picked up within this many
    # seconds (default 30). When 1,000 nodes connect at once, the event loop
    # spends ~25 s of CPU on their initial pushes and picks up new calls
    # slowly; the default cancelled ~10% of them (the benchmark's 868/1,000
    # stall). A node that waits is better served than one sent into backoff.
    ("grpc.server_max_unrequested_time_in_server", 300),
    # Explicit, not gRPC's 4 MiB default, which one push of ~23,000 workloads
    # exceeded; pushes are split far below this (xds_server.MAX_PUSH_BYTES).
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class Settings:
    grpc_listen: str = DEFAULT_GRPC_LISTEN
    http_listen: str | None = DEFAULT_HTTP_LISTEN
    # Only /healthz, /healthz/ready and /metrics, for the kubelet and Prometheus;
    # unlike http_listen (which also serves /debug/config_dump) it may face the network.
    health_listen: str | None = None
    # Names and IPs in the serving certificate; None: serving_tls.default_names.
    serving_names: tuple[str, ...] | None = None
    serving_ttl: datetime.timedelta = DEFAULT_SERVING_TTL
    # Debugging only: gRPC without TLS, so bearer tokens cross the network in clear.
    insecure: bool = False


class ControlPlane:
    def __init__(
        self,
        *,
        source: ConfigSource,
        mesh: MeshConfig,
        ca: CertificateAuthority,
        settings: Settings,
        authenticator: NodeAuthenticator | None = None,
        metrics: m.Metrics | None = None,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.metrics = metrics or m.Metrics()
        self._source = source
        self._ca = ca
        self._settings = settings
        self._authenticator = authenticator or BootstrapTokenAuthenticator(lambda: self.state.mesh)
        self.distribution = DistributionServer(self._authenticator, self.metrics)
        self.state = MeshState(mesh, ca.trust_bundle_pem, self.distribution.publish)
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        self.serving: ServingCertificate | None = None
        if not settings.insecure:
            self.serving = ServingCertificate(
                ca,
                settings.serving_names or default_names(settings.grpc_listen),
                ttl=settings.serving_ttl,
                clock=clock,
            )
        # The config source's watch: if it dies, the mesh silently stops following the file.
        self.supervisor = Supervisor(self._give_up)
        # Set when the control plane cannot go on; whoever runs it stops it and exits non-zero.
        self.failed = asyncio.Event()
        self.failure = ""
        self._http = http_endpoint.HttpEndpoint(self._http_routes())
        self._health = http_endpoint.HttpEndpoint(self._health_routes())
        self._ready = False
        self.grpc_port = 0
        self.http_port = 0
        self.health_port = 0

    async def start(self) -> None:
        server = self._server
        server.add_generic_rpc_handlers((self.distribution.handler(),))
        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(
            CertificateService(self._ca, self._authenticator, self.state, self.metrics), server
        )
        registry_pb2_grpc.add_WorkloadRegistryServicer_to_server(
            RegistryService(self._authenticator, self.state, self.metrics), server
        )
        listen = self._settings.grpc_listen
        try:
            if self.serving is None:
                self.grpc_port = server.add_insecure_port(listen)
            else:
                self.grpc_port = server.add_secure_port(listen, self.serving.credentials())
        except RuntimeError as exc:
            raise NodeSetupError(f"cannot listen on {listen}: {exc}") from exc
        await server.start()
        self.supervisor.start("config watch", lambda: self._source.watch(self.state.set_mesh))
        if self._settings.http_listen is not None:
            self.http_port = await start_http(self._http, self._settings.http_listen)
        if self._settings.health_listen is not None:
            self.health_port = await start_http(self._health, self._settings.health_listen)
        self._ready = True
        if self.serving is None:
            log.warning(
                "INSECURE: gRPC on %s is PLAINTEXT (--insecure-listen): node bootstrap tokens "
                "and certificates cross the network unencrypted and the control plane is not "
                "authenticated; use this for debugging only",
                listen,
            )
        else:
            log.info(
                "control plane serving gRPC over TLS on %s (port %d) as %s",
                listen,
                self.grpc_port,
                ", ".join(self.serving.names),
            )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop being ready, close streams (up to `grace` seconds), stop watching."""
        self._ready = False
        await self.supervisor.close()
        await self._server.stop(grace)
        await self._http.close()
        await self._health.close()

    @property
    def ready(self) -> bool:
        return self._ready and self.supervisor.not_ready() is None

    def _give_up(self, reason: str) -> None:
        log.critical("control plane stopping: %s", reason)
        self.failure = reason
        self.failed.set()

    def config_dump(self) -> dict[str, Any]:
        return {
            **self.state.dump(),
            "trust_bundle_pem": self._ca.trust_bundle_pem,
            "serving_certificate": None if self.serving is None else self.serving.dump(),
            "streams": self.distribution.dump(),
        }

    def _http_routes(self) -> dict[str, http_endpoint.Route]:
        def config_dump(_query: http_endpoint.Query) -> http_endpoint.Reply:
            body = json.dumps(self.config_dump(), indent=1, sort_keys=True) + "\n"
            return http_endpoint.text(body, content_type="application/json")

        return {
            "/healthz": lambda _query: http_endpoint.text("ok\n"),
            "/healthz/ready": http_endpoint.readiness(lambda: self.ready),
            "/metrics": http_endpoint.prometheus(self.metrics.render),
            "/debug/config_dump": config_dump,
        }

    def _health_routes(self) -> dict[str, http_endpoint.Route]:
        return health_routes(lambda: self.ready, self.metrics)


def health_routes(ready: Callable[[], bool], metrics: m.Metrics) -> dict[str, http_endpoint.Route]:
    """What --health-listen serves: probes and metrics, never the config dump."""
    return {
        # Liveness: the process answers at all (readiness may fail meanwhile).
        "/healthz": lambda _query: http_endpoint.text("ok\n"),
        "/healthz/ready": http_endpoint.readiness(ready),
        "/metrics": http_endpoint.prometheus(metrics.render),
    }


async def start_http(endpoint: http_endpoint.HttpEndpoint, listen: str) -> int:
    """Start `endpoint` on "host:port" (port 0: any); the port listened on."""
    host, _, port = listen.rpartition(":")
    try:
        return await endpoint.start(host.strip("[]"), int(port))
    except (OSError, ValueError) as exc:
        raise NodeSetupError(f"cannot listen on {listen}: {exc}") from exc
