"""`weir controlplane`: serve a mesh config file over delta xDS, and sign certificates."""

import argparse
import asyncio
import datetime
import logging
import signal
import sys
from pathlib import Path
from typing import Final

from controlplane.app import DEFAULT_GRPC_LISTEN, DEFAULT_HTTP_LISTEN, ControlPlane, Settings
from controlplane.ca import CertificateAuthority, load_intermediate, load_or_create_root
from controlplane.metrics import Metrics
from controlplane.sources import FileSource
from weir_common.errors import NodeSetupError, WeirError
from weir_common.supervision import wait_any

DEFAULT_STATE_DIR: Final = Path("/var/lib/weir/controlplane")
SHUTDOWN_GRACE_SECONDS: Final = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weir controlplane", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="mesh config YAML")
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
        default=DEFAULT_STATE_DIR,
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


async def _serve(args: argparse.Namespace) -> None:
    metrics = Metrics()
    source = FileSource(args.config, metrics)
    mesh = source.load()
    ca: CertificateAuthority
    if args.ca_cert:
        ca = load_intermediate(args.ca_cert, args.ca_key, args.ca_roots)
    else:
        ca = load_or_create_root(
            args.state_dir, mesh.trust_domain, now=datetime.datetime.now(datetime.UTC)
        )
    plane = ControlPlane(
        source=source,
        mesh=mesh,
        ca=ca,
        settings=Settings(
            grpc_listen=args.listen,
            http_listen=args.http_listen,
            serving_names=tuple(args.serving_name) if args.serving_name else None,
            insecure=args.insecure_listen,
        ),
        metrics=metrics,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await plane.start()
    try:
        await wait_any(stop, plane.failed)
    finally:
        await plane.stop(SHUTDOWN_GRACE_SECONDS)
    if plane.failure:
        raise NodeSetupError(f"stopped: {plane.failure}")
