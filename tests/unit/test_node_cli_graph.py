"""`weir node graph`: edges from the proxy's admin data, the DOT text, the picture drawn."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node_agent.node_cli.graph import Edge, draw, edges, to_dot

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/server"
INTRUDER = "spiffe://cluster.local/ns/legacy/sa/intruder"
DB = "spiffe://cluster.local/ns/default/sa/db"


def _ends(workload: str) -> tuple[str, str, str]:
    """(namespace, name, principal) of a workload key; all "unknown" for a stranger."""
    if workload == "unknown":
        return "unknown", "unknown", "unknown"
    namespace, name = workload.split("/")
    return namespace, name, _IDS[workload]


def _row(reporter: str, src: str, dst: str, mtls: bool, opened: int, failed: int) -> dict[str, Any]:
    src_ns, src_name, src_id = _ends(src)
    dst_ns, dst_name, dst_id = _ends(dst)
    return {
        "reporter": reporter,
        "source_workload": src_name,
        "source_workload_namespace": src_ns,
        "source_principal": src_id,
        "destination_workload": dst_name,
        "destination_workload_namespace": dst_ns,
        "destination_principal": dst_id,
        "destination_service": "unknown",
        "request_protocol": "tcp",
        "connection_security_policy": "mutual_tls" if mtls else "none",
        "opened": opened,
        "failed": failed,
    }


_IDS = {
    "default/client": CLIENT,
    "default/server": SERVER,
    "legacy/intruder": INTRUDER,
    "default/db": DB,
}

TRAFFIC = [
    # client -> server across nodes: this node saw it inbound only.
    _row("destination", "default/client", "default/server", True, 3, 0),
    # server -> db on this node: both reporters counted the same two connections.
    _row("source", "default/server", "default/db", True, 2, 0),
    _row("destination", "default/server", "default/db", True, 2, 0),
    # intruder -> db, denied by policy: never opened.
    _row("destination", "legacy/intruder", "default/db", True, 0, 4),
    # plaintext from outside the mesh (PERMISSIVE)
    _row("destination", "unknown", "default/server", False, 1, 0),
]
LIVE = [
    {
        "direction": "inbound",
        "src": {"addr": "10.244.1.2:40000", "workload": "default/client", "identity": CLIENT},
        "dst": {"addr": "10.244.2.3:8080", "workload": "default/server", "identity": SERVER},
        "security_policy": "mutual_tls",
    }
]


def test_edges_merge_reporters_and_mark_what_happened() -> None:
    graph = edges(TRAFFIC, LIVE)
    assert graph == sorted(graph)
    by_pair = {(e.source, e.destination): e for e in graph}
    assert by_pair[("default/client", "default/server")] == Edge(
        "default/client", "default/server", CLIENT, SERVER, True, 3, 0, 1
    )
    # Counted by both of its reporters on this node, the connection is still one.
    assert by_pair[("default/server", "default/db")].opened == 2
    assert by_pair[("legacy/intruder", "default/db")].kind == "failed"
    assert by_pair[("default/client", "default/server")].kind == "mutual_tls"
    assert by_pair[("unknown", "default/server")].kind == "plaintext"


def test_the_dot_text_matches_its_golden_file(golden: Callable[[str, str], None]) -> None:
    golden("node-cli/graph.dot", to_dot("node-2", edges(TRAFFIC, LIVE)))


def test_quotes_in_names_cannot_break_out_of_the_dot_text() -> None:
    hostile = Edge('a"; evil [x="1', "b", "x", "y", True, 1, 0, 0)
    dot = to_dot("n", [hostile])
    assert '"a\\"; evil [x=\\"1"' in dot


@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_graphviz_draws_the_picture(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"graph.{fmt}"
    draw(to_dot("node-2", edges(TRAFFIC, LIVE)), out, fmt)
    data = out.read_bytes()
    if fmt == "svg":
        assert b"<svg" in data and b"default/server" in data and b"failed/denied" in data
    else:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dot_that_graphviz_refuses_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="dot failed"):
        draw("digraph {", tmp_path / "x.svg", "svg")
