"""`weir cni install|uninstall`: put weir-cni on this node, or take it off.

The agent runs `install --watch` at start; a restart or an upgrade runs it
again, which changes nothing that is already right. `uninstall` is for a real
removal of Weir from the node only: while the plugin is in the chain, pods
need the agent, and taking the plugin out makes new pods start uncaptured.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from cni_plugin.protocol import DEFAULT_AGENT_SOCKET
from cni_plugin.request import (
    DEFAULT_AGENT_NAMESPACE,
    DEFAULT_AGENT_TIMEOUT_S,
    DEFAULT_EXCLUDE_NAMESPACES,
)
from node_agent.cni_install.conflist import PluginSettings
from node_agent.cni_install.installer import (
    ConfDirInstaller,
    install_plugin_binary,
    remove_plugin_binary,
)
from weir_common.errors import InvalidInputError

log = logging.getLogger(__name__)

DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIR = "/opt/cni/bin"
# Where the agent's image carries the frozen plugin (scripts/build-cni-plugin.sh).
DEFAULT_PLUGIN_BUNDLE = "/opt/weir/cni/weir-cni"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("cni", help="install or remove the weir-cni chained plugin")
    verbs = parser.add_subparsers(dest="verb", required=True)

    install = verbs.add_parser(
        "install",
        help="copy weir-cni to the bin dir and add it last to the primary network config",
        description="Idempotent: running it again changes nothing that is already right.",
    )
    _add_dirs(install)
    install.add_argument(
        "--plugin-bundle",
        type=Path,
        default=Path(DEFAULT_PLUGIN_BUNDLE),
        help=f"the frozen plugin directory holding weir-cni (default: {DEFAULT_PLUGIN_BUNDLE})",
    )
    install.add_argument("--agent-socket", default=DEFAULT_AGENT_SOCKET)
    install.add_argument(
        "--exclude-namespaces",
        default=",".join(DEFAULT_EXCLUDE_NAMESPACES),
        metavar="LIST",
        help="namespaces never captured, comma-separated (default: %(default)s)",
    )
    install.add_argument(
        "--agent-namespace",
        default=os.environ.get("POD_NAMESPACE", DEFAULT_AGENT_NAMESPACE),
        help="the agent's own namespace, never captured (default: $POD_NAMESPACE or %(default)s)",
    )
    install.add_argument(
        "--agent-timeout",
        type=float,
        default=DEFAULT_AGENT_TIMEOUT_S,
        metavar="SECONDS",
        help="how long the plugin waits for the agent on ADD (default: %(default)g)",
    )
    install.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the primary CNI's config to appear (default: %(default)g)",
    )
    install.add_argument(
        "--watch",
        action="store_true",
        help="then keep weir-cni in the config until SIGTERM (the agent's mode)",
    )
    install.set_defaults(func=_install)

    uninstall = verbs.add_parser(
        "uninstall",
        help="remove exactly what install added (for removing Weir from the node)",
    )
    _add_dirs(uninstall)
    uninstall.set_defaults(func=_uninstall)


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf-dir", type=Path, default=Path(DEFAULT_CONF_DIR))
    p.add_argument("--bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR))


def _settings(args: argparse.Namespace) -> PluginSettings:
    namespaces = tuple(n.strip() for n in args.exclude_namespaces.split(",") if n.strip())
    if not args.agent_namespace:
        raise InvalidInputError("--agent-namespace must not be empty")
    if not 0 < args.agent_timeout <= 120:
        raise InvalidInputError("--agent-timeout must be in (0, 120] seconds")
    return PluginSettings(
        agent_socket=args.agent_socket,
        exclude_namespaces=namespaces,
        agent_namespace=args.agent_namespace,
        agent_timeout_s=args.agent_timeout,
    )


def _install(args: argparse.Namespace) -> int:
    settings = _settings(args)
    link = install_plugin_binary(args.plugin_bundle, args.bin_dir)
    print(f"plugin: {link}")
    installer = ConfDirInstaller(args.conf_dir, settings)
    change = installer.install(args.wait_timeout)
    print(f"config: {change or 'weir-cni already in place'}", flush=True)
    if not args.watch:
        return 0
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    # Stopping is not uninstalling: a restart or an upgrade keeps pods captured.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    print(f"watching {args.conf_dir}", flush=True)
    installer.watch(stop)
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    change = ConfDirInstaller(args.conf_dir, PluginSettings()).remove()
    print(f"config: {change or 'weir-cni was not in any config'}")
    removed = remove_plugin_binary(args.bin_dir)
    print(f"plugin: removed {', '.join(removed)}" if removed else "plugin: was not installed")
    return 0
