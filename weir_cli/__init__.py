"""The `weir` command: one entry point, one subcommand module per subsystem.

The only package that imports both the node side and the control plane (for
`weir controlplane`); each side stays unaware of the other.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from weir_common import json_logging
from weir_common.errors import WeirError

# Each subcommand's module, imported only when that subcommand runs (or for
# --help): the proxy and agent pull in grpc, uvloop and h2, half a second of
# start-up that `weir redirect` and `weir cni` have no use for.
SUBCOMMANDS = {
    "redirect": "node_agent.redirect.cli",
    "demo": "node_agent.demo",
    "cni": "node_agent.cni_install.cli",
    "agent": "node_agent.agent.cli",
    "proxy": "node_agent.proxy.cli",
    "node": "node_agent.node_cli",
}


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv, skipping the global options and their values."""
    words = iter(argv)
    for word in words:
        if word in ("--log-level", "--log-format"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description=__doc__)
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default: warning)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=json_logging.FORMATS,
        help="text for people (default), or json: one object per line with time, level, "
        "component, logger, message (weir_common/json_logging.py)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = _chosen(argv)
    # Unknown or no subcommand (--help, a typo): register all, so argparse lists them.
    everything = chosen not in {*SUBCOMMANDS, "controlplane"}
    for name, module in SUBCOMMANDS.items():
        if everything or chosen == name:
            importlib.import_module(module).register(subparsers)
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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    # `weir controlplane` owns its flags; everything after it is passed through.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    json_logging.configure(args.log_level, args.log_format, component=args.command)
    try:
        code: int = args.func(args)
    except WeirError as e:
        # One line, no traceback: these are conditions an operator can act on.
        if args.log_format == "json":
            logging.getLogger("weir").error("%s", e.message)
        else:
            print(f"weir: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
