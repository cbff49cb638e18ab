"""`weir demo`: the embedded default, a local mesh in network namespaces."""

from __future__ import annotations

import argparse
import signal
from types import FrameType
from typing import NoReturn

from node_agent.demo import capture, mesh


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a throwaway local mesh (two nodes, four pods) and show what it does",
        description="Everything runs in network namespaces and is removed at the end.",
    )
    # A held mesh is there to be explored with `weir node`, which the
    # capture-only demo (no agent, no proxy) has nothing to answer.
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--capture-only",
        action="store_true",
        help="one node, no proxy: show only where capture sends each connection",
    )
    which.add_argument(
        "--hold",
        action="store_true",
        help="keep the mesh running after the table, to explore with `weir node`, "
        "until SIGINT or SIGTERM; then remove it",
    )
    parser.set_defaults(func=_run)


def _unwind(signum: int, _frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    # The demo owns this process: SIGTERM unwinds it as Ctrl-C does, through
    # every `with` that removes the namespaces, processes and rules it made.
    previous = signal.signal(signal.SIGTERM, _unwind)
    try:
        return capture.run() if args.capture_only else mesh.run(hold_mesh=args.hold)
    finally:
        signal.signal(signal.SIGTERM, previous)
