"""`weir node ...`: what this node is doing, answered from live state.

Every answer comes from what runs and what is installed: the agent's and the
proxy's admin listeners on loopback (their live state, not their config), and
for a pod the kernel itself (the capture rules or eBPF entries in its netns,
the listeners open there). Run it on the node, or in the node's netns.

Exit codes, for scripts: 0 healthy (or found), 1 a problem found (listed,
and under "problems" in JSON/YAML), 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from node_agent.constants import (
    ADMIN_PORT,
    INBOUND_PLAINTEXT_CAPTURE_PORT,
    INBOUND_TUNNEL_PORT,
    OUTBOUND_CAPTURE_PORT,
    PROXY_ADMIN_PORT,
)
from node_agent.enrollment.registry import PodRecord
from node_agent.netns import Netns
from node_agent.node_cli import graph as graph_mod
from node_agent.node_cli import logs as logs_mod
from node_agent.node_cli import render
from node_agent.node_cli import trace as trace_mod
from node_agent.node_cli import verify as verify_mod
from node_agent.node_cli.admin_client import Admin, AdminUnreachable
from node_agent.proxy.model import Workload
from node_agent.redirect.backend import Backend
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import BPFFS, DEFAULT_PIN_ROOT, PinLayout
from node_agent.redirect.iptables import IptablesCapture
from node_agent.redirect.podnet import TCP_LISTEN, tcp_sockets
from weir_common.errors import InvalidInputError, WeirError

PIN_ROOT_ENV: Final = "WEIR_BPF_PIN_ROOT"
# A renewal this late means renewing fails (renewal is due at half life).
RENEWAL_GRACE: Final = datetime.timedelta(minutes=5)
CAPTURE_PORTS: Final = (OUTBOUND_CAPTURE_PORT, INBOUND_PLAINTEXT_CAPTURE_PORT, INBOUND_TUNNEL_PORT)
EXIT_OK: Final = 0
EXIT_PROBLEM: Final = 1  # bad usage is argparse's 2


@dataclass
class Answer:
    """What a command found: `data` for JSON/YAML, `text` for the table, `problems` for both."""

    data: dict[str, Any]
    text: str
    problems: list[str] = field(default_factory=list)


Command = Callable[[argparse.Namespace], Answer]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "node", help="what this node is doing: pods, capture, certificates, connections"
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    commands: dict[str, tuple[Command, str]] = {
        "status": (status, "the node at a glance: agent, control plane, capture, proxy, certs"),
        "workloads": (workloads, "the pods this node enrolled, captured or not, served or not"),
        "services": (services, "the services in this node's config, with their endpoints"),
        "policies": (policies, "the authorization policies this node's pods are subject to"),
        "certs": (certs, "the workload certificates the proxy holds, and when they renew"),
        "connections": (connections, "the connections the proxy carries right now"),
        "pod": (pod, "one pod, with its capture and listeners checked in the kernel"),
        "trace": (trace, "what would happen to a connection: capture, endpoints, policy"),
        "verify": (
            lambda args: Answer(*verify_mod.answer(args)),
            "preflight of the node: kernel, iptables backends, CNI chain, UID 1337",
        ),
        "logs": (
            lambda args: Answer(*logs_mod.answer(args)),
            "recent logs of the agent, the proxy and weir-cni",
        ),
        "graph": (graph, "a picture (SVG or PNG) of the connections through this node's proxy"),
    }
    for verb, (command, text) in commands.items():
        p = verbs.add_parser(verb, help=text, description=text)
        if verb == "trace":
            p.add_argument("source", type=pod_key, metavar="SRC_POD", help="NAMESPACE/NAME")
            p.add_argument(
                "destination",
                type=destination_arg,
                metavar="DST[:PORT]",
                help="an IP, or a service or pod as NAMESPACE/NAME; PORT may be left out "
                "for a service with one port",
            )
        if verb == "pod":
            p.add_argument("pod", type=pod_key, metavar="NAMESPACE/NAME")
        if verb == "verify":
            verify_mod.add_arguments(p)
        if verb == "logs":
            logs_mod.add_arguments(p)
        if verb == "graph":
            graph_mod.add_arguments(p)
        if verb in ("status", "workloads", "pod", "trace", "verify"):  # those that check capture
            p.add_argument(
                "--bpf-pin-root",
                type=Path,
                default=Path(os.environ.get(PIN_ROOT_ENV, DEFAULT_PIN_ROOT)),
                help=f"where the agent pins eBPF capture (default: ${PIN_ROOT_ENV} or "
                f"{DEFAULT_PIN_ROOT})",
            )
        p.add_argument("-o", "--output", choices=render.FORMATS, default="table")
        p.add_argument("--agent-admin", type=port_arg, default=ADMIN_PORT, metavar="PORT")
        p.add_argument("--proxy-admin", type=port_arg, default=PROXY_ADMIN_PORT, metavar="PORT")
        p.set_defaults(func=lambda args, command=command: _run(command, args))


def pod_key(text: str) -> tuple[str, str]:
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/NAME")
    return namespace, name


def destination_arg(text: str) -> trace_mod.Destination:
    try:
        return trace_mod.parse_destination(text)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def port_arg(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port")
    return int(text)


def _run(command: Command, args: argparse.Namespace) -> int:
    try:
        answer = command(args)
    except AdminUnreachable as e:
        print(f"weir node: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    if args.output == "table":
        print(answer.text)
        for problem in answer.problems:
            print(f"problem: {problem}")
    else:
        print(render.document({**answer.data, "problems": answer.problems}, args.output))
    return EXIT_PROBLEM if answer.problems else EXIT_OK


def _agent(args: argparse.Namespace) -> Admin:
    return Admin("agent", "127.0.0.1", args.agent_admin)


def _proxy(args: argparse.Namespace) -> Admin:
    return Admin("proxy", "127.0.0.1", args.proxy_admin)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _ready(admin: Admin) -> tuple[bool, dict[str, str]]:
    status, body = admin.get("/healthz/ready")
    return status == 200, dict(body.get("reasons", {})) if isinstance(body, dict) else {}


# -- status --------------------------------------------------------------------


def status(args: argparse.Namespace) -> Answer:
    agent = _agent(args)
    node = agent.section("node")
    ready, reasons = _ready(agent)
    controlplane = agent.section("controlplane")
    pods = agent.section("pods")
    # Captured in the agent's eyes and in the kernel's: rules can go behind its back.
    captured = sum(
        1 for p in pods if p["status"] == "captured" and _in_kernel(p, args.bpf_pin_root)
    )
    problems = [f"agent not ready: {name}: {why}" for name, why in sorted(reasons.items())]
    if captured < len(pods):
        problems.append(
            f"{len(pods) - captured} of {len(pods)} pods not captured (weir node workloads)"
        )
    data: dict[str, Any] = {
        "node": node["node"],
        "agent": {"version": node["version"], "pid": node["pid"], "ready": ready},
        "redirect": {"mode": agent.section("capture")["mode"]},
        "controlplane": controlplane,
        "pods": {"seen": len(pods), "captured": captured},
    }
    try:
        proxy = _proxy(args)
        proxy_ready, proxy_reasons = _ready(proxy)
        served = proxy.section("pods")
        certificates = _certificates(proxy.section("certificates"))
        live = proxy.section("connections")
        proxy_version = proxy.section("node")["version"]
    except AdminUnreachable as e:
        problems.append(str(e))
        data["proxy"] = {"reachable": False}
        certificates = []
    else:
        problems += [f"proxy not ready: {name}: {why}" for name, why in proxy_reasons.items()]
        data["proxy"] = {
            "reachable": True,
            "ready": proxy_ready,
            "version": proxy_version,
            "pods_served": len(served),
            "connections": len(live),
        }
    problems += [problem for cert in certificates for problem in cert["problems"]]
    earliest = min((c["not_after"] for c in certificates), default=None)
    data["certificates"] = {"count": len(certificates), "earliest_expiry": earliest}
    nack = controlplane["last_nack"]
    proxy_data = data["proxy"]
    text = render.fields(
        [
            ("node", data["node"]),
            ("agent", f"{node['version']} pid {node['pid']}, {'ready' if ready else 'NOT READY'}"),
            ("redirect", data["redirect"]["mode"]),
            (
                "control plane",
                f"{controlplane['target']} "
                + ("connected" if controlplane["connected"] else "NOT CONNECTED"),
            ),
            (
                "config",
                ", ".join(f"{n} {kind}" for kind, n in sorted(controlplane["resources"].items())),
            ),
            ("last NACK", f"{nack['at']} {nack['type']}: {nack['reason']}" if nack else "none"),
            ("pods", f"{captured} captured of {len(pods)} seen"),
            (
                "proxy",
                (
                    f"{proxy_data['version']}, "
                    f"{'ready' if proxy_data['ready'] else 'NOT READY'}, "
                    f"{proxy_data['pods_served']} pods served, "
                    f"{proxy_data['connections']} connections"
                )
                if proxy_data["reachable"]
                else "NOT REACHABLE",
            ),
            ("certificates", f"{len(certificates)}, earliest expiry {earliest or '-'}"),
        ]
    )
    return Answer(data, text, problems)


# -- workloads -------------------------------------------------------------------


def workloads(args: argparse.Namespace) -> Answer:
    pods = _agent(args).section("pods")
    served = _served(args)
    problems: list[str] = []
    rows = []
    for record in sorted(pods, key=lambda p: (p["namespace"], p["name"])):
        key = f"{record['namespace']}/{record['name']}"
        held = served.get(record["uid"]) if served is not None else None
        in_kernel = _in_kernel(record, args.bpf_pin_root)
        rows.append(
            {
                "pod": key,
                "uid": record["uid"],
                "ips": [ip.split("/")[0] for ip in record["ips"]],
                "mode": record["mode"],
                "status": record["status"],
                "capture_in_kernel": in_kernel,
                "served_by_proxy": held is not None,
                "identity": held["identity"] if held else None,
            }
        )
        if record["status"] != "captured":
            problems.append(f"{key}: {record['status']}")
        if not in_kernel:
            problems.append(f"{key}: capture not as expected in the kernel (weir node pod {key})")
        if served is not None and held is None:
            problems.append(f"{key}: not served by the proxy")
    if served is None:
        problems.append("the proxy's admin does not answer: cannot tell which pods it serves")
    text = render.table(
        ["pod", "ips", "mode", "agent", "kernel", "proxy", "identity"],
        [
            [
                r["pod"],
                ",".join(r["ips"]),
                r["mode"],
                r["status"],
                "captured" if r["capture_in_kernel"] else "NOT CAPTURED",
                "serving" if r["served_by_proxy"] else "NOT SERVED",
                r["identity"],
            ]
            for r in rows
        ],
    )
    return Answer({"workloads": rows}, text, problems)


def _served(args: argparse.Namespace) -> dict[str, dict[str, Any]] | None:
    """The proxy's pods by uid; None when its admin does not answer."""
    try:
        served: dict[str, dict[str, Any]] = _proxy(args).section("pods")
    except AdminUnreachable:
        return None
    return served


# -- services and policies -----------------------------------------------------------


def services(args: argparse.Namespace) -> Answer:
    """From the config in force on this node (what the proxy routes with)."""
    snapshot = trace_mod.snapshot_from_dump(_agent(args).section("mesh"))
    rows: list[dict[str, Any]] = []
    problems = []
    for key, service in sorted(snapshot.services.items()):
        endpoints = [
            {"workload": w.key, "node": w.node, "ips": list(w.ips)}
            for w in (snapshot.workloads.get(e) for e in service.endpoints)
            if w is not None and w.ips
        ]
        if not endpoints:
            problems.append(f"{key}: no endpoint with an address")
        rows.append(
            {
                "service": key,
                "vips": list(service.vips),
                "ports": [{"port": p.port, "target_port": p.target_port} for p in service.ports],
                "endpoints": endpoints,
            }
        )
    text = render.table(
        ["service", "vips", "ports", "endpoints"],
        [
            [
                r["service"],
                ",".join(r["vips"]),
                ",".join(f"{p['port']}->{p['target_port']}" for p in r["ports"]),
                ", ".join(f"{e['workload']}@{e['node']}" for e in r["endpoints"]),
            ]
            for r in rows
        ],
    )
    return Answer({"services": rows}, text, problems)


def policies(args: argparse.Namespace) -> Answer:
    """The control plane sends a node only the policies that select its own pods."""
    agent = _agent(args)
    here = agent.section("node")["node"]
    snapshot = trace_mod.snapshot_from_dump(agent.section("mesh"))
    local = [w for w in snapshot.workloads.values() if w.node == here]
    rows: list[dict[str, Any]] = [
        {
            "policy": key,
            "action": policy.action.value,
            "selector": dict(policy.selector),
            "selects": sorted(w.key for w in local if policy.selects(w)),
            "rules": [
                {
                    "source_principals": list(r.source_principals),
                    "source_namespaces": list(r.source_namespaces),
                    "source_ip_blocks": list(r.source_ip_blocks),
                    "destination_ports": list(r.destination_ports),
                }
                for r in policy.rules
            ],
        }
        for key, policy in sorted(snapshot.policies.items())
    ]
    text = render.table(
        ["policy", "action", "selects", "rules"],
        [[r["policy"], r["action"], ",".join(r["selects"]), _rules_text(r["rules"])] for r in rows],
    )
    return Answer({"policies": rows}, text)


def _rules_text(rules: list[dict[str, list[Any]]]) -> str:
    """One rule as "from X ports Y", rules joined by " | "; "(none)" matches nothing."""
    parts = []
    for rule in rules:
        sources = (
            rule["source_principals"]
            + [f"ns:{n}" for n in rule["source_namespaces"]]
            + rule["source_ip_blocks"]
        )
        ports = ",".join(str(p) for p in rule["destination_ports"])
        parts.append(f"from {','.join(sources) or 'any'}" + (f" to {ports}" if ports else ""))
    return " | ".join(parts) or "(none)"


# -- certs -----------------------------------------------------------------------


def _certificates(dump: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    now = _now()
    out = []
    for identity, cert in sorted(dump.items()):
        not_after = datetime.datetime.fromisoformat(cert["not_after"])
        renewal_due = datetime.datetime.fromisoformat(cert["refresh_at"])
        problems = []
        if not_after <= now:
            problems.append(f"{identity}: certificate expired at {cert['not_after']}")
        elif renewal_due + RENEWAL_GRACE < now:
            problems.append(f"{identity}: renewal overdue since {cert['refresh_at']}")
        out.append(
            {
                "identity": identity,
                "serial": cert["serial"],
                "not_before": _seconds(cert["not_before"]),
                "not_after": _seconds(cert["not_after"]),
                "renewal_due": _seconds(cert["refresh_at"]),
                "expires_in_seconds": int((not_after - now).total_seconds()),
                "pods": cert["pods"],
                "problems": problems,
            }
        )
    return out


def _seconds(timestamp: str) -> str:
    return datetime.datetime.fromisoformat(timestamp).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def certs(args: argparse.Namespace) -> Answer:
    certificates = _certificates(_proxy(args).section("certificates"))
    text = render.table(
        ["identity", "serial", "not after", "renewal due", "expires in", "pods"],
        [
            [
                c["identity"],
                c["serial"][:16] + ("…" if len(c["serial"]) > 16 else ""),
                c["not_after"],
                c["renewal_due"],
                _duration(c["expires_in_seconds"]),
                c["pods"],
            ]
            for c in certificates
        ],
    )
    problems = [p for c in certificates for p in c.pop("problems")]
    return Answer({"certificates": certificates}, text, problems)


# -- connections -------------------------------------------------------------------


def connections(args: argparse.Namespace) -> Answer:
    live: list[dict[str, Any]] = _proxy(args).section("connections")
    text = render.table(
        ["direction", "source", "source identity", "destination", "dest identity", "mtls", "up",
         "down", "age"],
        [
            [
                c["direction"],
                c["src"]["workload"] or c["src"]["addr"],
                c["src"]["identity"],
                c["dst"]["workload"] or c["dst"]["addr"],
                c["dst"]["identity"],
                "yes" if c["security_policy"] == "mutual_tls" else "no",
                c["bytes_up"],
                c["bytes_down"],
                f"{c['age_seconds']:.1f}s",
            ]
            for c in live
        ],
    )  # fmt: skip
    return Answer({"connections": live}, text)


def graph(args: argparse.Namespace) -> Answer:
    proxy = _proxy(args)
    return Answer(*graph_mod.answer(args, proxy, proxy.section("node")["node"]))


# -- pod ---------------------------------------------------------------------------


def pod(args: argparse.Namespace) -> Answer:
    namespace, name = args.pod
    key = f"{namespace}/{name}"
    records = [
        p for p in _agent(args).section("pods") if (p["namespace"], p["name"]) == (namespace, name)
    ]
    if not records:
        return Answer({"pod": key, "found": False}, f"pod {key}: not enrolled on this node",
                      [f"{key}: not enrolled on this node"])  # fmt: skip
    record = PodRecord.from_json(records[0])
    served = _served(args)
    held = served.get(record.uid) if served is not None else None
    problems: list[str] = []
    if records[0]["status"] != "captured":
        problems.append(f"agent: {records[0]['status']}")
    if served is None:
        problems.append("the proxy's admin does not answer")
    elif held is None:
        problems.append("the proxy does not serve this pod")
    capture, listeners = _kernel(record, args.bpf_pin_root, problems)
    certificate = None
    if held is not None:
        dump = _proxy(args).section("certificates")
        found = _certificates({k: v for k, v in dump.items() if k == held["identity"]})
        certificate = found[0] if found else None
        if certificate is None:
            problems.append(f"the proxy holds no certificate for {held['identity']}")
        else:
            problems += certificate.pop("problems")
    data = {
        "pod": key,
        "found": True,
        "uid": record.uid,
        "ips": [ip.split("/")[0] for ip in record.ips],
        "netns": record.netns,
        "agent_status": records[0]["status"],
        "capture": capture,
        "listeners": listeners,
        "proxy": {"served": held is not None, "identity": held["identity"] if held else None},
        "certificate": certificate,
    }
    lines = [
        render.fields(
            [
                ("pod", key),
                ("uid", record.uid),
                ("ips", ", ".join(data["ips"])),
                ("netns", record.netns),
                ("agent", data["agent_status"]),
                (
                    "capture",
                    f"{capture['mode']}: "
                    + (
                        "installed as expected"
                        if capture["as_expected"]
                        else "NOT CAPTURED: the kernel's rules differ from what is expected"
                    ),
                ),
                (
                    "listeners",
                    " ".join(
                        f"{port}/{'ok' if port not in listeners['missing'] else 'MISSING'}"
                        for port in listeners["expected"]
                    ),
                ),
                ("proxy", f"serving as {held['identity']}" if held else "NOT SERVING"),
                (
                    "certificate",
                    f"serial {certificate['serial']}, not after {certificate['not_after']}, "
                    f"renewal due {certificate['renewal_due']}"
                    if certificate
                    else None,
                ),
            ]
        )
    ]
    if capture["diff"]:
        lines += ["capture diff (expected vs installed):", *(f"  {d}" for d in capture["diff"])]
    return Answer(data, "\n".join(lines), problems)


def _capture_diff(record: PodRecord, ns: Netns, pin_root: Path) -> list[str]:
    """Installed capture versus expected, by the redirect code's own check; empty: as expected."""
    if ns.inode != record.netns_inode:
        return [f"{record.netns} is another netns than the one enrolled"]
    if record.mode == "ebpf":
        if not BPFFS.is_mount():
            # `ip netns exec` remounts /sys in a mount namespace of its own.
            return [
                f"cannot see the eBPF pins: no bpffs mounted at {BPFFS} here "
                "(run in the node's netns with nsenter --net=NETNS, not ip netns exec)"
            ]
        with EbpfCapture(PinLayout(pin_root)) as ebpf:
            return ebpf.check(ns, record.capture)
    backend = Backend(record.mode.removeprefix("iptables-"))
    return IptablesCapture(backend).check(ns, record.capture)


def _in_kernel(record: dict[str, Any], pin_root: Path) -> bool:
    """Whether an enrolled pod's capture is in the kernel exactly as expected."""
    parsed = PodRecord.from_json(record)
    try:
        ns = Netns.validate(parsed.netns)
    except WeirError:
        return False
    return not _capture_diff(parsed, ns, pin_root)


def _kernel(
    record: PodRecord, pin_root: Path, problems: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Capture and listeners as the pod's netns holds them now."""
    expected_ports = list(CAPTURE_PORTS)
    try:
        ns = Netns.validate(record.netns)
    except WeirError as e:
        problems.append(f"netns: {e.message}")
        return (
            {"mode": record.mode, "as_expected": False, "diff": [f"netns: {e.message}"]},
            {"expected": expected_ports, "present": [], "missing": expected_ports},
        )
    diff = _capture_diff(record, ns, pin_root)
    if diff:
        problems.append(f"capture: NOT as expected ({len(diff)} differences)")
    families = {6 if ":" in ip else 4 for ip in record.ips}
    present = sorted(
        {
            s.local[1]
            for s in tcp_sockets(ns)
            if s.state == TCP_LISTEN and s.local[1] in CAPTURE_PORTS and s.family in families
        }
    )
    missing = [port for port in expected_ports if port not in present]
    if missing:
        problems.append(f"listeners missing in the pod's netns: {missing}")
    return (
        {"mode": record.mode, "as_expected": not diff, "diff": diff},
        {"expected": expected_ports, "present": present, "missing": missing},
    )


# -- trace -------------------------------------------------------------------------


def trace(args: argparse.Namespace) -> Answer:
    agent = _agent(args)
    here = agent.section("node")["node"]
    snapshot = trace_mod.snapshot_from_dump(agent.section("mesh"))
    src_key = "/".join(args.source)
    source = snapshot.workloads.get(src_key)
    if source is None:
        problem = f"{src_key}: no such pod in this node's config"
        return Answer({"source": src_key, "found": False}, problem, [problem])
    resolved = trace_mod.resolve_destination(snapshot, args.destination)
    captured, why = _source_capture(args, here, source, resolved)
    result = trace_mod.decide(
        snapshot, here=here, source=source, captured=captured, resolved=resolved
    )
    problems = [] if captured is not False else [f"{src_key} is not captured: {why}"]
    if result["route"] == "mesh" and not result["endpoints"]:
        problems.append(f"{result['service'] or result['dialed']}: no endpoints")
    problems += [
        f"{e['workload']}: denied ({e['reason']})"
        for e in result["endpoints"]
        if e["allowed"] is False
    ]
    data = {
        "source": {
            "pod": src_key,
            "node": source.node,
            "ips": list(source.ips),
            "identity": str(source.identity(snapshot.trust_domain)),
            "captured": captured,
            "capture": why,
        },
        **result,
    }
    state = {True: "captured", False: "NOT CAPTURED", None: "unknown here"}[captured]
    head = render.fields(
        [
            ("source", f"{src_key} on {source.node}, {', '.join(source.ips)}"),
            ("identity", data["source"]["identity"]),
            ("capture", f"{state}: {why}"),
            (
                "destination",
                f"dialed {result['dialed']}"
                + (f", service {result['service']}" if result["service"] else "")
                + f": {result['route']}"
                + (f" ({result['why']})" if "why" in result else ""),
            ),
        ]
    )
    verdicts = {True: "ALLOW", False: "DENY", None: "-"}
    rows = [
        [e["workload"], e["address"], e["node"], e["identity"], "yes" if e["mtls"] else "no",
         verdicts[e["allowed"]], e["reason"]]
        for e in result["endpoints"]
    ]  # fmt: skip
    table = render.table(
        ["endpoint", "address", "node", "identity", "mtls", "decision", "why"], rows
    )
    return Answer(data, f"{head}\n{table}" if rows else head, problems)


def _source_capture(
    args: argparse.Namespace,
    here: str,
    source: Workload,
    resolved: trace_mod.Resolved,
) -> tuple[bool | None, str]:
    """Whether the source's connection to `resolved` is captured, checked in the kernel."""
    if source.node != here:
        return None, f"{source.key} runs on {source.node}: its capture is checked there"
    records = [
        p
        for p in _agent(args).section("pods")
        if (p["namespace"], p["name"]) == (source.namespace, source.name)
    ]
    if not records:
        return False, "not enrolled on this node"
    record = PodRecord.from_json(records[0])
    capture, _ = _kernel(record, args.bpf_pin_root, [])
    if not capture["as_expected"]:
        return False, f"{record.mode} rules not as expected (see weir node pod {source.key})"
    if resolved.port in record.capture.exclude_outbound_ports:
        return False, f"outbound port {resolved.port} is excluded from capture"
    address = ipaddress.ip_address(resolved.address)
    for cidr in record.capture.exclude_outbound_cidrs:
        if address in cidr:
            return False, f"{cidr} is excluded from capture"
    return True, f"{record.mode} rules as expected"
