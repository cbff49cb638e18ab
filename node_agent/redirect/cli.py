"""`weir redirect apply|check|remove`: the capture engine, by hand, for one netns."""

from __future__ import annotations

import argparse
import logging
import os

from node_agent.errors import InvalidInputError
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend, BackendChoice, choose_backend, probe_host
from node_agent.redirect.config import CaptureConfig, parse_cidrs, parse_ports
from node_agent.redirect.iptables import IptablesCapture, dry_run_text

log = logging.getLogger(__name__)

BACKEND_ENV = "WEIR_IPTABLES_BACKEND"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "redirect", help="install, verify or remove capture rules in a pod network namespace"
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, text in (
        ("apply", "install capture rules (a no-op when already in place)"),
        ("check", "exit 0 if the netns holds exactly the expected rules, else print the drift"),
        ("remove", "remove every Weir rule and chain, leaving other rules untouched"),
    ):
        p = verbs.add_parser(verb, help=text, description=text)
        p.add_argument("--netns", required=True, help="path of the pod's network namespace")
        p.add_argument(
            "--iptables-backend",
            choices=["auto", *Backend],
            default=os.environ.get(BACKEND_ENV, "auto"),
            help=f"iptables backend (default: ${BACKEND_ENV} or auto-detect from the host)",
        )
        if verb != "remove":
            _add_exclusions(p)
        if verb == "apply":
            p.add_argument(
                "--dry-run", action="store_true", help="print the exact rules, change nothing"
            )
        p.set_defaults(func=_run)


def _add_exclusions(p: argparse.ArgumentParser) -> None:
    for flag, text in (
        ("--exclude-outbound-ports", "outbound TCP ports that bypass the proxy, e.g. 22,443"),
        ("--exclude-inbound-ports", "inbound TCP ports that reach the app directly"),
        ("--include-inbound-ports", "capture only these inbound ports (default: all)"),
        ("--exclude-outbound-cidrs", "destinations that bypass the proxy, e.g. 10.0.0.0/8"),
    ):
        p.add_argument(flag, action="append", default=[], metavar="LIST", help=text)


def _config(args: argparse.Namespace) -> CaptureConfig:
    return CaptureConfig(
        exclude_outbound_ports=parse_ports(args.exclude_outbound_ports, "--exclude-outbound-ports"),
        exclude_inbound_ports=parse_ports(args.exclude_inbound_ports, "--exclude-inbound-ports"),
        include_inbound_ports=parse_ports(args.include_inbound_ports, "--include-inbound-ports"),
        exclude_outbound_cidrs=parse_cidrs(args.exclude_outbound_cidrs, "--exclude-outbound-cidrs"),
    )


def _backend(requested: str) -> BackendChoice:
    if requested not in ("auto", *Backend):
        raise InvalidInputError(f"${BACKEND_ENV}: {requested!r} is not one of auto, nft, legacy")
    choice = choose_backend(None if requested == "auto" else Backend(requested), probe_host())
    log.info("iptables backend: %s (%s)", choice.backend, choice.reason)
    return choice


def _run(args: argparse.Namespace) -> int:
    # Validate everything before touching anything: bad input changes nothing.
    config = _config(args) if args.verb != "remove" else CaptureConfig()
    ns = Netns.validate(args.netns)
    choice = _backend(args.iptables_backend)
    print(f"backend: iptables-{choice.backend} ({choice.reason})")
    if args.verb == "apply" and args.dry_run:
        print(dry_run_text(config, choice.backend), end="")
        return 0
    capture = IptablesCapture(choice.backend)
    if args.verb == "apply":
        report = capture.apply(ns, config)
        for family, changed in report.changed.items():
            print(f"IPv{family}: {'applied' if changed else 'already in place'}")
        for family in report.cleaned_other_backend:
            print(f"IPv{family}: removed stale Weir rules from the other iptables backend")
        return 0
    if args.verb == "check":
        problems = capture.check(ns, config)
        for line in problems:
            print(line)
        print("capture rules: " + ("DRIFT" if problems else "as expected"))
        return 1 if problems else 0
    print("removed" if capture.remove(ns) else "nothing to remove")
    return 0
