"""`python -m testbed.k8s_cluster up|down|import|relay` (what the k8s-* Make targets run)."""

from __future__ import annotations

import argparse
import socket
import sys
from ipaddress import IPv4Address
from pathlib import Path

from node_agent.netns import Netns
from testbed.k8s_cluster.cluster import ClusterError, down, import_image, up
from testbed.k8s_cluster.relay import serve_forever


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.k8s_cluster")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a cluster (builds what is missing)")
    start.add_argument("--state-dir", type=Path, default=Path("build/k8s"))
    start.add_argument("--nodes", type=int, default=2)
    stop = commands.add_parser("down", help="remove the cluster and all it made")
    stop.add_argument("--state-dir", type=Path, default=Path("build/k8s"))
    load = commands.add_parser("import", help="import an OCI archive into every node")
    load.add_argument("archive", type=Path)
    load.add_argument("--state-dir", type=Path, default=Path("build/k8s"))
    relay = commands.add_parser("relay", help="(internal) host port -> API server relay")
    relay.add_argument("--listen-fd", type=int, required=True)
    relay.add_argument("--netns", type=Path, required=True)
    relay.add_argument("--target", required=True)
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            cluster = up(args.state_dir, args.nodes)
            print(f"kubeconfig: {cluster.spec.admin_kubeconfig}")
            print(f"cluster ready: {len(cluster.spec.nodes)} nodes", flush=True)
        elif args.command == "down":
            down(args.state_dir)
        elif args.command == "import":
            import_image(args.state_dir, args.archive)
        else:
            host, port = args.target.rsplit(":", 1)
            listener = socket.socket(fileno=args.listen_fd)
            serve_forever(listener, Netns.validate(args.netns), IPv4Address(host), int(port))
    except ClusterError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
