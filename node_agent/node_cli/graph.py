"""`weir node graph`: the node's traffic as a picture, for people who would rather look.

Workloads are the graph's nodes; an edge is a pair of workloads that talked
through this node's proxy, labelled with both identities and drawn by what
happened: green for mutual TLS, grey for plaintext, red and dashed for
connections that failed (refused by policy, or unreachable). The data comes
from the proxy's admin: its live connections and its counts of connections
opened and failed since it started (the same numbers as its `istio_tcp_*`
metrics). Building the graph and writing it as Graphviz DOT are pure
functions; Graphviz's `dot` turns the DOT into SVG or PNG.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from node_agent.node_cli import render
from node_agent.node_cli.admin_client import Admin

UNKNOWN: Final = "unknown"
FORMATS: Final = ("svg", "png")
DOT_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True, order=True)
class Edge:
    source: str
    destination: str
    source_identity: str
    destination_identity: str
    mtls: bool
    opened: int
    failed: int
    live: int

    @property
    def kind(self) -> str:
        if self.opened == 0 and self.live == 0:
            return "failed"
        return "mutual_tls" if self.mtls else "plaintext"


def _workload(namespace: str, name: str) -> str:
    return UNKNOWN if UNKNOWN in (namespace, name) else f"{namespace}/{name}"


def edges(traffic: Iterable[Mapping[str, Any]], live: Iterable[Mapping[str, Any]]) -> list[Edge]:
    """One edge per (source, destination, identities, security), from the proxy's admin data.

    A connection between two pods of this node is counted by both of its
    reporters (outbound and inbound); the larger count is the connection's.
    """
    counts: dict[tuple[str, str, str, str, bool], list[int]] = {}
    for row in traffic:
        key = (
            _workload(row["source_workload_namespace"], row["source_workload"]),
            _workload(row["destination_workload_namespace"], row["destination_workload"]),
            row["source_principal"],
            row["destination_principal"],
            row["connection_security_policy"] == "mutual_tls",
        )
        opened_failed_live = counts.setdefault(key, [0, 0, 0])
        opened_failed_live[0] = max(opened_failed_live[0], int(row["opened"]))
        opened_failed_live[1] = max(opened_failed_live[1], int(row["failed"]))
    for connection in live:
        src, dst = connection["src"], connection["dst"]
        key = (
            src["workload"] or src["addr"],
            dst["workload"] or dst["addr"],
            src["identity"] or UNKNOWN,
            dst["identity"] or UNKNOWN,
            connection["security_policy"] == "mutual_tls",
        )
        counts.setdefault(key, [0, 0, 0])[2] += 1
    return sorted(Edge(*key, *values) for key, values in counts.items())


_STYLE: Final = {
    "mutual_tls": 'color="#2e7d32", fontcolor="#2e7d32", penwidth=2',
    "plaintext": 'color="#757575", fontcolor="#757575"',
    "failed": 'color="#c62828", fontcolor="#c62828", style=dashed',
}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _short(identity: str) -> str:
    """spiffe://td/ns/N/sa/S reads as sa S (ns N); anything else as it is."""
    parts = identity.split("/")
    if identity.startswith("spiffe://") and len(parts) == 7:
        return f"{parts[6]} ({parts[4]})"
    return identity


def to_dot(node: str, graph: Iterable[Edge]) -> str:
    """Graphviz DOT of `graph`, stable for a given input (golden-tested)."""
    graph = list(graph)
    names = sorted({e.source for e in graph} | {e.destination for e in graph})
    lines = [
        "digraph weir {",
        f"  label={_quote(f'node {node}: connections through its proxy')};",
        '  labelloc=t; rankdir=LR; fontname="Helvetica";',
        '  node [shape=box, style="rounded,filled", fillcolor="#f5f5f5", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    lines += [f"  {_quote(name)};" for name in names]
    for e in graph:
        verdict = {"mutual_tls": "mTLS", "plaintext": "plaintext", "failed": "failed/denied"}[
            e.kind
        ]
        counts = f"{e.opened} opened, {e.failed} failed, {e.live} live"
        label = f"{verdict}\\n{_short(e.source_identity)} -> {_short(e.destination_identity)}"
        label += f"\\n{counts}"
        lines.append(
            f'  {_quote(e.source)} -> {_quote(e.destination)} [label="{label}", {_STYLE[e.kind]}];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(dot: str, out: Path, fmt: str) -> None:
    """Write `dot` as `fmt` to `out` with Graphviz; raises RuntimeError saying why not."""
    program = shutil.which("dot")
    if program is None:
        raise RuntimeError("Graphviz's dot is not installed (Debian: apt-get install graphviz)")
    done = subprocess.run(
        [program, f"-T{fmt}", "-o", str(out)],
        input=dot,
        capture_output=True,
        text=True,
        timeout=DOT_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"dot failed: {done.stderr.strip()}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("weir-graph.svg"),
        help="picture to write (default weir-graph.svg); its suffix picks SVG or PNG",
    )


def answer(
    args: argparse.Namespace, proxy: Admin, node: str
) -> tuple[dict[str, Any], str, list[str]]:
    graph = edges(proxy.section("traffic"), proxy.section("connections"))
    fmt = args.out.suffix.lstrip(".").lower()
    problems: list[str] = []
    if fmt not in FORMATS:
        problems.append(f"{args.out}: the suffix must be .svg or .png")
    else:
        try:
            draw(to_dot(node, graph), args.out, fmt)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"cannot write {args.out}: {e}")
    rows = [
        [e.source, e.destination, e.kind, _short(e.source_identity),
         _short(e.destination_identity), e.opened, e.failed, e.live]
        for e in graph
    ]  # fmt: skip
    text = render.table(
        ["source", "destination", "security", "source identity", "dest identity", "opened",
         "failed", "live"],
        rows,
    )  # fmt: skip
    if not problems:
        text += f"\npicture: {args.out}"
    data = {
        "node": node,
        "picture": None if problems else str(args.out),
        "edges": [
            {
                "source": e.source,
                "destination": e.destination,
                "security": e.kind,
                "source_identity": e.source_identity,
                "destination_identity": e.destination_identity,
                "opened": e.opened,
                "failed": e.failed,
                "live": e.live,
            }
            for e in graph
        ],
    }
    return data, text, problems
