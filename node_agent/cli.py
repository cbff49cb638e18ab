"""The `weir` command: one entry point, one subcommand module per subsystem."""

from __future__ import annotations

import argparse
import logging
import sys

from node_agent import demo
from node_agent.agent import cli as agent_cli
from node_agent.cni_install import cli as cni_cli
from node_agent.errors import WeirError
from node_agent.proxy import cli as proxy_cli
from node_agent.redirect import cli as redirect_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description=__doc__)
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default: warning)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    redirect_cli.register(subparsers)
    demo.register(subparsers)
    cni_cli.register(subparsers)
    agent_cli.register(subparsers)
    proxy_cli.register(subparsers)
    controlplane = subparsers.add_parser(
        "controlplane",
        help="run the control plane (config over delta xDS, workload CA)",
        add_help=False,
    )
    controlplane.set_defaults(func=_controlplane, passthrough=True)
    return parser


def _controlplane(args: argparse.Namespace) -> int:
    # Imported on use: grpc and protobuf add a second to every other command's start.
    from controlplane import cli  # noqa: PLC0415

    rest: list[str] = args.rest
    return cli.main(rest)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `weir controlplane` owns its flags; everything after it is passed through.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args)
    except WeirError as e:
        # One line, no traceback: these are conditions an operator can act on.
        print(f"weir: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
