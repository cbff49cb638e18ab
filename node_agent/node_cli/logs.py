"""`weir node logs`: what the agent, the proxy and weir-cni said lately.

The agent and the proxy each keep their last records in memory and serve
them on their admin listener (`/logs`, see node_agent.admin.log_ring), so
this works wherever their stderr went. weir-cni keeps no log of its own: it
is a short-lived binary the container runtime runs; its lines go to its
stderr (the runtime's log) and, with each request, to the agent, which logs
them under one logger. Those are its records here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from node_agent.admin.log_ring import CAPACITY
from node_agent.node_cli import render
from node_agent.node_cli.admin_client import Admin, AdminUnreachable

COMPONENTS: Final = ("agent", "proxy", "cni")
# The agent logs what weir-cni sent with a request under this logger (cni_events.server).
CNI_LOGGER: Final = "weir.cni_plugin"
DEFAULT_LINES: Final = 100
SOURCES: Final = {
    "agent": "the agent's admin /logs (its last records, in memory)",
    "proxy": "the proxy's admin /logs (its last records, in memory)",
    "cni": f"weir-cni keeps no log file: its lines go to the container runtime's log "
    f"(stderr) and, with each request, to the agent, which logs them as {CNI_LOGGER}",
}


def lines_arg(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= CAPACITY:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to {CAPACITY}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lines",
        type=lines_arg,
        default=DEFAULT_LINES,
        metavar="N",
        help=f"the newest N records (default {DEFAULT_LINES}, at most {CAPACITY})",
    )
    parser.add_argument(
        "--component",
        choices=COMPONENTS,
        action="append",
        help="only this component's records (repeatable; default all)",
    )


# -- decisions (pure) ------------------------------------------------------------


def split_agent(records: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The agent's records, with weir-cni's relayed lines apart as component cni."""
    out: dict[str, list[dict[str, Any]]] = {"agent": [], "cni": []}
    for record in records:
        component = "cni" if record.get("logger") == CNI_LOGGER else "agent"
        out[component].append({**record, "component": component})
    return out


def merge(
    by_component: Mapping[str, Sequence[Mapping[str, Any]]], wanted: Sequence[str], lines: int
) -> list[dict[str, Any]]:
    """The newest `lines` records of the wanted components, oldest first."""
    merged = sorted(
        (dict(r) for c in wanted for r in by_component.get(c, [])),
        # ISO times in UTC sort as text; the stable sort keeps each process's own order.
        key=lambda r: str(r.get("time", "")),
    )
    return merged[-lines:]


# -- reading the admin listeners ---------------------------------------------------


def _records(admin: Admin, lines: int) -> list[dict[str, Any]]:
    status, body = admin.get(f"/logs?lines={lines}")
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise AdminUnreachable(
            f"the {admin.name} admin at {admin.host}:{admin.port} serves no /logs "
            f"(status {status}; an older version?)"
        )
    return [r for r in body["records"] if isinstance(r, dict)]


def answer(args: argparse.Namespace) -> tuple[dict[str, Any], str, list[str]]:
    wanted: list[str] = args.component or list(COMPONENTS)
    by_component: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    if "agent" in wanted or "cni" in wanted:
        try:
            # weir-cni's lines are a few among the agent's: ask for all to find N of them.
            agent = _records(Admin("agent", "127.0.0.1", args.agent_admin), CAPACITY)
        except AdminUnreachable as e:
            problems.append(str(e))
        else:
            by_component.update(split_agent(agent))
    if "proxy" in wanted:
        try:
            proxy = _records(Admin("proxy", "127.0.0.1", args.proxy_admin), args.lines)
        except AdminUnreachable as e:
            problems.append(str(e))
        else:
            by_component["proxy"] = [{**r, "component": "proxy"} for r in proxy]
    records = merge(by_component, wanted, args.lines)
    shown = [
        {k: r.get(k, "") for k in ("time", "component", "level", "logger", "message")}
        for r in records
    ]
    data: dict[str, Any] = {"records": shown, "sources": {c: SOURCES[c] for c in wanted}}
    text = render.table(
        ["time", "component", "level", "logger", "message"],
        [
            (r["time"], r["component"], r["level"], r["logger"], r["message"])
            for r in data["records"]
        ],
    )
    if "cni" in wanted:
        text += f"\n\ncni: {SOURCES['cni']}"
    return data, text, problems
