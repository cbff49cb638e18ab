"""`weir redirect ...`: the capture engine, by hand, for one netns, in either mode.

apply|check|remove take `--mode iptables|ebpf|auto`; uninstall-ebpf removes
the node-wide eBPF programs and pins; uninstall-host-probes removes the
node's kubelet-probe SNAT rules (run in the node's netns); preflight says
whether eBPF can run here; verify opens a real connection from inside a pod to prove capture.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from node_agent.netns import Netns
from node_agent.redirect import selfcheck
from node_agent.redirect.backend import Backend, BackendChoice, choose_backend, probe_host
from node_agent.redirect.config import CaptureConfig, parse_cidrs, parse_ports
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.maps import pod_entries, render
from node_agent.redirect.ebpf.pins import DEFAULT_PIN_ROOT, PinLayout
from node_agent.redirect.ebpf.preflight import Preflight, run_preflight
from node_agent.redirect.host_probes import HOST_PROBES_CHAIN, remove_host_probes
from node_agent.redirect.iptables import IptablesCapture, dry_run_text
from node_agent.redirect.modes import Mode, select_mode
from node_agent.redirect.podnet import netns_cookie, pod_addresses
from weir_common.errors import InvalidInputError, NodeSetupError

log = logging.getLogger(__name__)

BACKEND_ENV = "WEIR_IPTABLES_BACKEND"
MODE_ENV = "WEIR_REDIRECT_MODE"
PIN_ROOT_ENV = "WEIR_BPF_PIN_ROOT"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "redirect", help="install, verify or remove capture in a pod network namespace"
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, text in (
        ("apply", "install capture (a no-op when already in place)"),
        ("check", "exit 0 if the pod's capture is exactly as expected, else print the drift"),
        ("remove", "remove the pod's capture, leaving everything else untouched"),
    ):
        p = verbs.add_parser(verb, help=text, description=text)
        p.add_argument("--netns", required=True, help="path of the pod's network namespace")
        p.add_argument(
            "--mode",
            choices=list(Mode),
            default=os.environ.get(MODE_ENV, Mode.IPTABLES),
            help=f"capture mode (default: ${MODE_ENV} or iptables); auto picks eBPF when its "
            "preflight passes; remove with auto removes both",
        )
        p.add_argument(
            "--iptables-backend",
            choices=["auto", *Backend],
            default=os.environ.get(BACKEND_ENV, "auto"),
            help=f"iptables backend (default: ${BACKEND_ENV} or auto-detect from the host)",
        )
        _add_pin_root(p)
        if verb != "remove":
            _add_exclusions(p)
        if verb == "apply":
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="print exactly what would be installed, change nothing",
            )
        p.set_defaults(func=_run)

    p = verbs.add_parser(
        "uninstall-ebpf",
        help="detach and remove every eBPF program, link and map Weir pinned",
        description="detach and remove every eBPF program, link and map Weir pinned",
    )
    _add_pin_root(p)
    p.set_defaults(func=_uninstall)

    p = verbs.add_parser(
        "uninstall-host-probes",
        help=f"remove the node's kubelet-probe SNAT ({HOST_PROBES_CHAIN}) from every backend",
        description=f"remove {HOST_PROBES_CHAIN} and its jump from this netns (the node's), "
        "in both iptables backends; probes of STRICT pods fail afterwards",
    )
    p.set_defaults(func=_uninstall_host_probes)

    p = verbs.add_parser(
        "preflight",
        help="check whether this node can run the eBPF mode, and say why not",
        description="check whether this node can run the eBPF mode (loads, never attaches)",
    )
    _add_pin_root(p)
    p.set_defaults(func=_preflight)

    p = verbs.add_parser(
        "verify",
        help="connect from inside the pod and report whether capture really took it",
        description=selfcheck.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--netns", required=True, help="path of the pod's network namespace")
    p.add_argument("--timeout", type=float, default=2.0, help="probe connect timeout (s)")
    p.set_defaults(func=_verify)


def _add_pin_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bpf-pin-root",
        type=Path,
        default=Path(os.environ.get(PIN_ROOT_ENV, DEFAULT_PIN_ROOT)),
        help=f"where eBPF pins live (default: ${PIN_ROOT_ENV} or {DEFAULT_PIN_ROOT})",
    )


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


def _mode(requested: str) -> Mode:
    if requested not in list(Mode):
        raise InvalidInputError(f"${MODE_ENV}: {requested!r} is not one of iptables, ebpf, auto")
    return Mode(requested)


def _run(args: argparse.Namespace) -> int:
    # Validate everything before touching anything: bad input changes nothing.
    config = _config(args) if args.verb != "remove" else CaptureConfig()
    ns = Netns.validate(args.netns)
    requested = _mode(args.mode)
    pins = PinLayout(args.bpf_pin_root)
    if args.verb == "remove":
        return _remove(args, ns, requested, pins)
    choice, preflight = select_mode(requested, pins)
    if choice.mode == Mode.EBPF:
        print(f"mode: ebpf ({choice.reason})")
        return _run_ebpf(args, ns, config, pins, preflight)
    backend = _backend(args.iptables_backend)
    print(f"backend: iptables-{backend.backend} ({backend.reason})")
    print(f"mode: iptables ({choice.reason})")
    return _run_iptables(args, ns, config, backend, pins)


def _run_iptables(
    args: argparse.Namespace,
    ns: Netns,
    config: CaptureConfig,
    choice: BackendChoice,
    pins: PinLayout,
) -> int:
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
        # Two modes capturing one pod would each see the other's redirects.
        with EbpfCapture(pins) as ebpf:
            if ebpf.remove(ns):
                print("removed this pod's eBPF capture (switched to iptables)")
        return 0
    problems = capture.check(ns, config)
    for line in problems:
        print(line)
    print("capture rules: " + ("DRIFT" if problems else "as expected"))
    return 1 if problems else 0


def _run_ebpf(
    args: argparse.Namespace,
    ns: Netns,
    config: CaptureConfig,
    pins: PinLayout,
    preflight: Preflight | None,
) -> int:
    compiled = preflight.compiled if preflight is not None else None
    with EbpfCapture(pins, precompiled=compiled) as capture:
        if args.verb == "apply" and args.dry_run:
            print(f"# map entries for netns {ns.path} (pins under {pins.root})")
            print(render(pod_entries(netns_cookie(ns), config, pod_addresses(ns))), end="")
            return 0
        if args.verb == "apply":
            for line in capture.apply(ns, config).lines():
                print(line)
            _remove_iptables_rules(args, ns)
            return 0
        problems = capture.check(ns, config)
    for line in problems:
        print(line)
    print("eBPF capture: " + ("DRIFT" if problems else "as expected"))
    return 1 if problems else 0


def _remove_iptables_rules(args: argparse.Namespace, ns: Netns) -> None:
    """After an eBPF apply: Weir's iptables rules in the pod would redirect a second time."""
    try:
        capture = IptablesCapture(_backend(args.iptables_backend).backend)
    except NodeSetupError as e:
        log.debug("no iptables to clean up after switching to eBPF: %s", e.message)
        return
    if capture.remove(ns):
        print("removed this pod's iptables capture rules (switched to eBPF)")


def _remove(args: argparse.Namespace, ns: Netns, requested: Mode, pins: PinLayout) -> int:
    removed = False
    if requested in (Mode.EBPF, Mode.AUTO):
        with EbpfCapture(pins) as ebpf:
            removed |= ebpf.remove(ns)
    if requested in (Mode.IPTABLES, Mode.AUTO):
        choice = _backend(args.iptables_backend)
        print(f"backend: iptables-{choice.backend} ({choice.reason})")
        removed |= IptablesCapture(choice.backend).remove(ns)
    print("removed" if removed else "nothing to remove")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    removed = loader.uninstall(PinLayout(args.bpf_pin_root))
    for pin in removed:
        print(f"removed {args.bpf_pin_root}/{pin}")
    print("eBPF capture uninstalled" if removed else "nothing installed")
    return 0


def _uninstall_host_probes(_args: argparse.Namespace) -> int:
    removed = remove_host_probes()
    print(f"removed {HOST_PROBES_CHAIN}" if removed else "nothing installed")
    return 0


def _preflight(args: argparse.Namespace) -> int:
    preflight = run_preflight(PinLayout(args.bpf_pin_root))
    if preflight.compiled is not None:
        preflight.compiled.close()
    for line in preflight.lines():
        print(line)
    return 0 if preflight.ok else 1


def _verify(args: argparse.Namespace) -> int:
    verdicts = selfcheck.verify(Netns.validate(args.netns), timeout=args.timeout)
    for v in verdicts:
        print(v.line())
    if any(v.captured is False for v in verdicts):
        return 1
    return 0 if all(v.captured for v in verdicts) else 2
