"""The `weir` command: one entry point, one subcommand module per subsystem."""

from __future__ import annotations

import argparse
import logging
import sys

from node_agent import demo
from node_agent.errors import WeirError
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
