"""`weir controlplane`: serve a mesh (config file or cluster) over delta xDS; sign certificates."""

import argparse
import asyncio
import dataclasses
import datetime
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Final

from controlplane.app import (
    DEFAULT_GRPC_LISTEN,
    DEFAULT_HTTP_LISTEN,
    ControlPlane,
    Settings,
    health_routes,
    start_http,
)
from controlplane.ca import CertificateAuthority, load_intermediate, load_or_create_root
from controlplane.metrics import Metrics
from controlplane.sources import FileSource
from weir_common import http_endpoint
from weir_common.errors import NodeSetupError, WeirError
from weir_common.supervision import wait_any

DEFAULT_STATE_DIR: Final = Path("/var/lib/weir/controlplane")
SHUTDOWN_GRACE_SECONDS: Final = 5.0
# Kubernetes mode (docs/kubernetes.md).
DEFAULT_NAMESPACE: Final = "weir-system"
DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
DEFAULT_NODE_SERVICE_ACCOUNTS: Final = ("weir-system/weir-agent", "weir-system/weir-proxy")
DEFAULT_TOKEN_AUDIENCE: Final = "weir"  # noqa: S105 (an audience, not a secret)
_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9.\-_]+")
# Flags that only mean something with --kubernetes (dest names).
_KUBERNETES_ONLY: Final = (
    "kubeconfig",
    "namespace",
    "trust_domain",
    "node_service_account",
    "token_audience",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weir controlplane", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", type=Path, help="mesh config YAML (local mode)")
    mode.add_argument(
        "--kubernetes",
        action="store_true",
        help="read the mesh from the Kubernetes API; nodes authenticate by TokenReview",
    )
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig of the cluster (default: the in-cluster service account)",
    )
    parser.add_argument(
        "--namespace",
        help=f"where Secret weir-ca and ConfigMap weir-ca-root live (default {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--trust-domain", help=f"SPIFFE trust domain (default {DEFAULT_TRUST_DOMAIN})"
    )
    parser.add_argument(
        "--node-service-account",
        action="append",
        metavar="NS/NAME",
        help="ServiceAccount whose pod-bound tokens identify a node (repeatable; default "
        + " and ".join(DEFAULT_NODE_SERVICE_ACCOUNTS)
        + ")",
    )
    parser.add_argument(
        "--token-audience",
        help=f"audience node tokens must carry (default {DEFAULT_TOKEN_AUDIENCE})",
    )
    parser.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="a second HTTP listener serving only /healthz/ready and /metrics (for the kubelet)",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_GRPC_LISTEN,
        help=f"gRPC address, TLS: xDS, CA, registry (default {DEFAULT_GRPC_LISTEN})",
    )
    parser.add_argument(
        "--serving-name",
        action="append",
        metavar="NAME",
        help="DNS name or IP nodes dial, put in the TLS serving certificate (repeatable; "
        "default: localhost, 127.0.0.1 and the --listen host)",
    )
    parser.add_argument(
        "--insecure-listen",
        action="store_true",
        help="serve gRPC WITHOUT TLS (tokens in clear, server unauthenticated); debugging only",
    )
    parser.add_argument(
        "--http-listen",
        default=DEFAULT_HTTP_LISTEN,
        help=f"health, readiness, metrics (default {DEFAULT_HTTP_LISTEN})",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the generated root CA is kept; nodes verify the control plane "
        f"against its root-cert.pem (default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument("--ca-cert", type=Path, help="operator intermediate (then its parents)")
    parser.add_argument("--ca-key", type=Path, help="key of --ca-cert")
    parser.add_argument("--ca-roots", type=Path, help="roots that anchor --ca-cert")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    args = parser.parse_args(argv)
    intermediate = (args.ca_cert, args.ca_key, args.ca_roots)
    if any(intermediate) and not all(intermediate):
        parser.error("--ca-cert, --ca-key and --ca-roots go together")
    if args.insecure_listen and args.serving_name:
        parser.error("--serving-name has no use with --insecure-listen")
    if args.kubernetes:
        if any(intermediate) or args.state_dir is not None:
            parser.error(
                "--state-dir and --ca-* have no use with --kubernetes (the root is Secret weir-ca)"
            )
        _kubernetes_defaults(parser, args)
    else:
        given = [f"--{d.replace('_', '-')}" for d in _KUBERNETES_ONLY if getattr(args, d)]
        if given:
            parser.error(f"{', '.join(given)}: only with --kubernetes")
        args.state_dir = args.state_dir or DEFAULT_STATE_DIR
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(args))
    except WeirError as exc:
        print(f"weir controlplane: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _kubernetes_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.namespace = args.namespace or DEFAULT_NAMESPACE
    args.trust_domain = args.trust_domain or DEFAULT_TRUST_DOMAIN
    args.token_audience = args.token_audience or DEFAULT_TOKEN_AUDIENCE
    if not _DNS_LABEL.fullmatch(args.namespace):
        parser.error(f"--namespace {args.namespace!r} is not a namespace name")
    if not _TRUST_DOMAIN.fullmatch(args.trust_domain):
        parser.error(f"--trust-domain {args.trust_domain!r} is not a valid trust domain")
    accounts = []
    for text in args.node_service_account or DEFAULT_NODE_SERVICE_ACCOUNTS:
        namespace, _, name = text.partition("/")
        if not _DNS_LABEL.fullmatch(namespace) or not re.fullmatch(r"[a-z0-9][-a-z0-9.]*", name):
            parser.error(f"--node-service-account {text!r} is not NAMESPACE/NAME")
        accounts.append((namespace, name))
    args.node_service_accounts = tuple(accounts)


async def _serve(args: argparse.Namespace) -> None:
    metrics = Metrics()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    settings = Settings(
        grpc_listen=args.listen,
        http_listen=args.http_listen,
        health_listen=args.health_listen,
        serving_names=tuple(args.serving_name) if args.serving_name else None,
        insecure=args.insecure_listen,
    )
    if args.kubernetes:
        await _serve_kubernetes(args, settings, metrics, stop)
        return
    source = FileSource(args.config, metrics)
    mesh = source.load()
    ca: CertificateAuthority
    if args.ca_cert:
        ca = load_intermediate(args.ca_cert, args.ca_key, args.ca_roots)
    else:
        ca = load_or_create_root(
            args.state_dir, mesh.trust_domain, now=datetime.datetime.now(datetime.UTC)
        )
    plane = ControlPlane(source=source, mesh=mesh, ca=ca, settings=settings, metrics=metrics)
    await _run(plane, stop)
    if plane.failure:
        raise NodeSetupError(f"stopped: {plane.failure}")


async def _serve_kubernetes(
    args: argparse.Namespace, settings: Settings, metrics: Metrics, stop: asyncio.Event
) -> None:
    # Probes are answered from the start: liveness while the first lists are
    # pending (a slow API server is no reason to be restarted), readiness once
    # the control plane serves.
    serving: list[ControlPlane] = []
    health = http_endpoint.HttpEndpoint(
        health_routes(lambda: bool(serving) and serving[0].ready, metrics)
    )
    if settings.health_listen is not None:
        await start_http(health, settings.health_listen)
    try:
        failure = await _kubernetes_plane(
            args, dataclasses.replace(settings, health_listen=None), metrics, stop, serving
        )
    finally:
        await health.close()
    if failure:
        raise NodeSetupError(f"stopped: {failure}")


async def _kubernetes_plane(
    args: argparse.Namespace,
    settings: Settings,
    metrics: Metrics,
    stop: asyncio.Event,
    serving: list[ControlPlane],
) -> str:
    """Serve until stopped; why the control plane gave up, or "" when it was stopped."""
    # Imported here: file mode needs neither the client nor its import time.
    from controlplane.kubernetes import tokenreview  # noqa: PLC0415
    from controlplane.kubernetes.api import describe, new_api_client  # noqa: PLC0415
    from controlplane.kubernetes.ca_store import load_or_create_root_secret  # noqa: PLC0415
    from controlplane.kubernetes.source import KubernetesSource, cluster_resources  # noqa: PLC0415

    api_client = new_api_client(args.kubeconfig)
    try:
        ca = await asyncio.to_thread(
            load_or_create_root_secret,
            api_client,
            args.namespace,
            args.trust_domain,
            now=datetime.datetime.now(datetime.UTC),
        )
    except WeirError:
        raise
    except Exception as exc:
        raise NodeSetupError(
            f"cannot load or create the root CA (Secret {args.namespace}/weir-ca): {describe(exc)}"
        ) from exc
    source = KubernetesSource(cluster_resources(api_client), args.trust_domain, metrics)
    try:
        # Nothing is served before the first whole view: an empty mesh pushed
        # to a node would withdraw every workload it knows.
        synced = asyncio.ensure_future(source.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait((synced, stopped), return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not synced.done():
            synced.cancel()
            return ""
        plane = ControlPlane(
            source=source,
            mesh=synced.result(),
            ca=ca,
            settings=settings,
            authenticator=tokenreview.TokenReviewAuthenticator(
                tokenreview.api_review(api_client),
                tokenreview.api_read_pod(api_client),
                audience=args.token_audience,
                service_accounts=args.node_service_accounts,
                metrics=metrics,
            ),
            metrics=metrics,
        )
        serving.append(plane)
        await _run(plane, stop)
        return plane.failure
    finally:
        await source.close()


async def _run(plane: ControlPlane, stop: asyncio.Event) -> None:
    await plane.start()
    try:
        await wait_any(stop, plane.failed)
    finally:
        await plane.stop(SHUTDOWN_GRACE_SECONDS)
