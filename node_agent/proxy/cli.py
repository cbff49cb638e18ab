"""`weir proxy run`: the node proxy as a process.

Config and certificates come from the control plane (delta xDS and its CA,
authenticated with the node's token). Pods normally arrive from the node
agent; until it drives the proxy, `--pod NAMESPACE/NAME=NETNS` serves a pod
by hand once the control plane knows it (registered, with IPs).

Started as root with `--drop-to-uid 1337`, the process switches to the proxy
user keeping only CAP_SYS_ADMIN and CAP_NET_ADMIN before it starts any thread.
`--workers N` runs N proxy processes sharing every listener, one core's
worth each (see node_agent/proxy/workers.py); the first one serves the
metrics, readiness and admin ports for all of them.
SIGTERM or SIGINT: hand over to a successor proxy if one is coming (see
`--await-successor-seconds` and `--handover-seconds`), close the listeners,
drain for `--drain-seconds`, exit.
`--admin-listen` (loopback only) serves /config_dump, /logging,
/healthz/ready and POST /quitquitquit (the same graceful stop).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import uvloop

from node_agent.admin import log_ring
from node_agent.admin.log_levels import PROXY_COMPONENTS
from node_agent.admin.server import AdminRegistry, HttpEndpoint, node_info
from node_agent.constants import (
    METRICS_PORT,
    PROXY_ADMIN_PORT,
    PROXY_GID,
    PROXY_UID,
    READINESS_PORT,
)
from node_agent.controlplane_access import ControlPlaneEndpoint, TokenFile
from node_agent.netns import Netns
from node_agent.proxy import privileges, workers
from node_agent.proxy.agent_pods import AgentPods
from node_agent.proxy.controlplane import ProxyControlPlaneClient
from node_agent.proxy.http2.keepalive import KeepaliveSettings
from node_agent.proxy.identity import CaCertificateProvider
from node_agent.proxy.model import Workload
from node_agent.proxy.proxy import HBONE_KEEPALIVE, Proxy, ProxySettings, build
from node_agent.proxy.routing import Balancing
from node_agent.proxy.telemetry import values_to_json
from node_agent.proxy.xds_source import XdsConfigSource
from node_agent.proxy_handoff.protocol import MAX_WORKERS
from node_agent.proxy_handoff.proxy_side import ProxyHandoffClient
from weir_common.errors import InvalidInputError, NodeSetupError, TransientError
from weir_common.mesh import resource_name
from weir_common.supervision import wait_any

log = logging.getLogger(__name__)

POD_WAIT_SECONDS: Final = 30.0
POD_POLL_SECONDS: Final = 0.2
HANDOFF_TASK: Final = "agent handoff"
DEFAULT_WORKERS: Final = 1
# Beyond its own drain and handover, how long a stopping first worker waits for the others.
WORKERS_EXIT_MARGIN_SECONDS: Final = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("proxy", help="the node proxy (HBONE, mTLS, L4 authorization)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="run the node proxy until SIGTERM", description=__doc__)
    run.add_argument("--control-plane", required=True, metavar="HOST:PORT")
    trust = run.add_mutually_exclusive_group(required=True)
    trust.add_argument(
        "--control-plane-roots", type=Path, metavar="PEM", help="mesh roots to verify it with"
    )
    trust.add_argument(
        "--insecure", action="store_true", help="plaintext to the control plane (local mode)"
    )
    run.add_argument("--node", required=True, help="this node's name in the mesh")
    run.add_argument("--token-file", required=True, type=Path, help="the node's bootstrap token")
    run.add_argument(
        "--pod",
        action="append",
        default=[],
        type=parse_pod,
        metavar="NAMESPACE/NAME=NETNS",
        help="serve this pod (repeatable), until the node agent hands pods over",
    )
    run.add_argument(
        "--agent-socket",
        type=Path,
        metavar="PATH",
        help="follow the node agent's pod handoff on this Unix socket (how pods normally arrive)",
    )
    run.add_argument(
        "--drop-to-uid",
        type=int,
        metavar="UID",
        help=f"switch to this user keeping only the needed capabilities (use {PROXY_UID})",
    )
    run.add_argument("--drop-to-gid", type=int, default=PROXY_GID, metavar="GID")
    run.add_argument(
        "--metrics-listen",
        type=parse_listen,
        default=("0.0.0.0", METRICS_PORT),  # noqa: S104 - Prometheus scrapes the node
        metavar="HOST:PORT",
    )
    run.add_argument(
        "--readiness-listen",
        type=parse_listen,
        metavar="HOST:PORT",
        help=f"a separate /healthz/ready listener (default: none; the metrics port serves it, "
        f"and {READINESS_PORT} belongs to the node agent, which shares the pod's netns)",
    )
    run.add_argument(
        "--admin-listen",
        type=parse_loopback_listen,
        default=("127.0.0.1", PROXY_ADMIN_PORT),
        metavar="HOST:PORT",
        help=f"the admin listener, loopback only (default: 127.0.0.1:{PROXY_ADMIN_PORT})",
    )
    run.add_argument(
        "--drain-seconds",
        type=non_negative_seconds,
        default=5.0,
        help="after closing the listeners, how long open connections may go on (default 5)",
    )
    run.add_argument(
        "--handover-seconds",
        type=non_negative_seconds,
        default=10.0,
        help="on SIGTERM, how long to keep the listeners open for a connected successor proxy "
        "to take every pod (default 10)",
    )
    run.add_argument(
        "--await-successor-seconds",
        type=non_negative_seconds,
        default=0.0,
        help="on SIGTERM with no successor connected to the agent, how long to wait for one "
        "(default 0; a rolling update that stops this proxy before its successor starts "
        "needs a few seconds)",
    )
    run.add_argument(
        "--balancing", choices=[b.value for b in Balancing], default=Balancing.ROUND_ROBIN.value
    )
    run.add_argument(
        "--workers",
        type=worker_count,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="proxy processes sharing every listener, each using up to one core; the first "
        "serves the metrics, readiness and admin ports for all (default "
        f"{DEFAULT_WORKERS}, up to {MAX_WORKERS})",
    )
    run.add_argument(
        "--hbone-keepalive-seconds",
        type=non_negative_seconds,
        default=HBONE_KEEPALIVE.interval,
        metavar="SECONDS",
        help="a peer node's proxy silent this long is sent an HTTP/2 PING, which also keeps "
        "quiet pooled connections through a firewall or NAT; 0 sends none "
        f"(default {HBONE_KEEPALIVE.interval:g})",
    )
    run.add_argument(
        "--hbone-keepalive-timeout-seconds",
        type=non_negative_seconds,
        default=HBONE_KEEPALIVE.timeout,
        metavar="SECONDS",
        help="no answer to that PING this long: the peer is taken for dead, its connection "
        f"and the apps' connections through it reset (default {HBONE_KEEPALIVE.timeout:g})",
    )
    run.set_defaults(func=_run)


def hbone_keepalive(interval: float, timeout: float) -> KeepaliveSettings | None:
    """The HBONE keepalive the two flags ask for (None: off); InvalidInputError if they clash."""
    if interval == 0:
        return None
    if timeout == 0:
        raise InvalidInputError(
            "--hbone-keepalive-timeout-seconds must be above 0 while keepalive is on "
            "(--hbone-keepalive-seconds 0 turns it off)"
        )
    return KeepaliveSettings(interval=interval, timeout=timeout)


def worker_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of workers from 1 to {MAX_WORKERS}"
        )
    return int(text)


def parse_pod(text: str) -> tuple[str, Netns]:
    key, sep, path = text.partition("=")
    namespace, slash, name = key.partition("/")
    if not sep or not slash or not namespace or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/NAME=NETNS")
    try:
        return resource_name(namespace, name), Netns.validate(path)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def non_negative_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 3600")
    return seconds


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_loopback_listen(text: str) -> tuple[str, int]:
    """HOST:PORT on loopback: the admin routes stop the proxy and change its logging."""
    host, port = parse_listen(text)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(f"{text!r}: the admin listener must be on loopback")
    return host, port


def _run(args: argparse.Namespace) -> int:
    # Read what only root may read (the token, the roots) before dropping privileges.
    # The token file is read again when it changes (the kubelet rotates it; on
    # Kubernetes its group 1337 may read it); where it no longer may, the token read here stays.
    token = TokenFile(args.token_file, keep_when_denied=True)
    try:
        token.token()
    except TransientError as e:
        raise InvalidInputError(e.message) from None
    if args.insecure:
        endpoint = ControlPlaneEndpoint.insecure(args.control_plane)
    else:
        endpoint = ControlPlaneEndpoint.tls(args.control_plane, args.control_plane_roots)
    keepalive = hbone_keepalive(args.hbone_keepalive_seconds, args.hbone_keepalive_timeout_seconds)
    if args.drop_to_uid is not None:
        privileges.drop_to(args.drop_to_uid, args.drop_to_gid)
        log.info(
            "running as uid %d gid %d, ambient capabilities %#x",
            args.drop_to_uid,
            args.drop_to_gid,
            privileges.ambient_capabilities(),
        )
    settings = replace(
        ProxySettings(),
        metrics_address=args.metrics_listen,
        readiness_address=args.readiness_listen,
        balancing=Balancing(args.balancing),
        hbone_keepalive=keepalive,
    )
    # Before the loop and any thread: each worker then builds its own.
    role = workers.fork(args.workers)
    workers.label_logs(role)
    if isinstance(role, workers.Follower):
        # Operators, Prometheus and the kubelet talk to the first worker only.
        settings = replace(settings, metrics_address=None, readiness_address=None)
    plan = Plan(
        settings,
        endpoint,
        node=args.node,
        token=token,
        pods=args.pod,
        agent_socket=args.agent_socket,
        stopping=Stopping(
            drain=args.drain_seconds,
            handover=args.handover_seconds,
            await_successor=args.await_successor_seconds,
        ),
        admin_address=args.admin_listen,
    )
    uvloop.run(_serve(plan, role))
    return 0


@dataclass(frozen=True)
class Plan:
    """What `weir proxy run` was asked to do, the same for every worker."""

    settings: ProxySettings
    endpoint: ControlPlaneEndpoint
    node: str
    token: TokenFile
    pods: list[tuple[str, Netns]]
    agent_socket: Path | None
    stopping: Stopping
    admin_address: tuple[str, int]


async def _serve(plan: Plan, role: workers.Role) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    group = None
    if isinstance(role, workers.Leader) and role.followers:
        group = workers.WorkerGroup(role.followers)
        await group.start()
    failed: list[tuple[int, int]] = []
    try:
        await _serve_proxy(plan, role, group, stop)
    finally:
        if group is not None:
            stopping = plan.stopping
            failed = await group.wait_exited(
                stopping.await_successor
                + stopping.handover
                + stopping.drain
                + WORKERS_EXIT_MARGIN_SECONDS
            )
            await group.close()
    if group is not None and group.failure:
        raise NodeSetupError(f"proxy stopped: {group.failure}")
    if failed:
        raise NodeSetupError(
            "; ".join(f"worker {index} exited with status {code}" for index, code in failed)
        )


async def _serve_proxy(
    plan: Plan, role: workers.Role, group: workers.WorkerGroup | None, stop: asyncio.Event
) -> None:
    settings, node = plan.settings, plan.node
    async with ProxyControlPlaneClient(plan.endpoint, node, plan.token) as client:
        proxy = build(
            settings, config=XdsConfigSource(client), certificates=CaCertificateProvider(client)
        )
        await proxy.start()
        handoff = None
        if plan.agent_socket is not None:
            handoff = ProxyHandoffClient(
                plan.agent_socket, AgentPods(proxy, node), hello=role.hello
            )
            proxy.supervisor.start(HANDOFF_TASK, handoff.run)
        registry = _admin(proxy, node, stop, handoff)
        surface = _Surface(ends=[stop, proxy.failed])
        if isinstance(role, workers.Follower):
            leader_gone = asyncio.Event()
            surface.ends.append(leader_gone)
            surface.leader_channel = loop_task(
                _answer_leader(role, proxy, registry), leader_gone.set
            )
        else:
            if group is not None:
                _serve_for_all(proxy, registry, group)
                surface.ends.append(group.failed)
            # reuse_port: on Kubernetes the next proxy starts beside this one (maxSurge).
            surface.admin = HttpEndpoint(registry, *plan.admin_address, admin=True, reuse_port=True)
        try:
            if surface.admin is not None:
                await surface.admin.start()
            for key, netns in plan.pods:
                await proxy.add_pod(netns, await _registered_workload(proxy, key))
            if isinstance(role, workers.Follower):
                log.info("worker %d of %d ready", role.index, role.workers)
            else:
                log.info(
                    "proxy ready (metrics port %s, readiness port %s, %d workers)",
                    proxy.metrics_port,
                    proxy.readiness_port,
                    role.workers,
                )
            await wait_any(*surface.ends)
        finally:
            if group is not None:
                # At once: every worker hands over and drains alongside this one.
                group.stop()
            await _wind_down(proxy, handoff, stop, plan.stopping)
            await surface.close()
        if proxy.failure:
            raise NodeSetupError(f"proxy stopped: {proxy.failure}")


@dataclass
class _Surface:
    """What a worker shows outside: the first its admin listener, the others their
    channel to it; and the events that end it."""

    ends: list[asyncio.Event]
    admin: HttpEndpoint | None = None
    leader_channel: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        if self.leader_channel is not None:
            self.leader_channel.cancel()
            await asyncio.gather(self.leader_channel, return_exceptions=True)


async def _wind_down(
    proxy: Proxy, handoff: ProxyHandoffClient | None, stop: asyncio.Event, stopping: Stopping
) -> None:
    if handoff is not None:
        if stop.is_set() and not proxy.failed.is_set():
            # Listeners stay open (and pods keep arriving) until the
            # successor has them too: closing ours then moves their
            # queued connections to it instead of resetting them.
            handover = await handoff.hand_over(
                await_connect=stopping.await_successor, await_sync=stopping.handover
            )
            level = logging.INFO if handover.handed_over else logging.WARNING
            log.log(level, "handover: %s", handover.detail)
        # Stop taking pods; the agent hands them to the next proxy.
        await proxy.supervisor.stop(HANDOFF_TASK)
    await proxy.shutdown(stopping.drain)


def loop_task(coro: Coroutine[Any, Any, None], then: Callable[[], None]) -> asyncio.Task[None]:
    """`coro` as a task; `then` runs once it is over, however it ended."""
    task = asyncio.get_running_loop().create_task(coro)
    task.add_done_callback(lambda _task: then())
    return task


async def _answer_leader(role: workers.Follower, proxy: Proxy, registry: AdminRegistry) -> None:
    def answer(request: dict[str, Any]) -> Any:  # noqa: ANN401 - JSON
        ask = request.get("ask")
        if ask == "report":
            reasons = registry.not_ready()
            return {
                "not_ready": "; ".join(reasons.values()) or None,
                "metrics": values_to_json(proxy.metrics.values()),
            }
        if ask == "section" and request.get("name") in registry.sections:
            return registry.sections[request["name"]]()
        if ask == "logs":
            return log_ring.process_ring().recent(int(request["lines"]))
        raise ValueError(f"cannot answer {ask!r} {request.get('name', '')}")

    await workers.serve_leader(role.channel, answer)
    log.warning("the first worker closed its channel: stopping")


def _serve_for_all(proxy: Proxy, registry: AdminRegistry, group: workers.WorkerGroup) -> None:
    """The first worker's metrics, readiness and sections count every worker in."""
    proxy.other_workers_metrics = group.metric_values
    proxy.readiness_checks.append(group.not_ready)
    own = registry.sections["connections"]

    async def connections() -> list[dict[str, Any]]:
        theirs = await group.sections("connections")
        everyone: list[dict[str, Any]] = [*own(), *(c for each in theirs for c in each)]
        return sorted(everyone, key=lambda c: -float(c["age_seconds"]))

    registry.sections["connections"] = connections
    registry.add_section("workers", lambda: group.dump(proxy.metrics.values()))
    registry.more_logs = group.logs
    proxy.supervisor.start("worker reports", group.report)


@dataclass(frozen=True)
class Stopping:
    """How the proxy stops (seconds each)."""

    drain: float
    handover: float
    await_successor: float


def _admin(
    proxy: Proxy, node: str, stop: asyncio.Event, handoff: ProxyHandoffClient | None
) -> AdminRegistry:
    registry = AdminRegistry(log_components=PROXY_COMPONENTS, on_quit=stop.set)
    registry.add_section("node", lambda: node_info(node))
    for name, section in proxy.admin_sections().items():
        registry.add_section(name, section)
    proxy.readiness_checks.append(lambda: "stopping" if stop.is_set() else None)
    if handoff is not None:
        proxy.readiness_checks.append(lambda: _handoff_not_ready(handoff))
    registry.add_readiness("proxy", proxy.not_ready)
    return registry


def _handoff_not_ready(handoff: ProxyHandoffClient) -> str | None:
    """Not ready until it holds the agent's pods, nor once a successor is taking over.

    On Kubernetes both proxies of a rollout answer probes on the same host
    port, so the old one must not answer "ready" for its successor.
    """
    if not handoff.synced.is_set():
        return "has not received the node agent's pods yet"
    if handoff.successors.connected:
        return "a successor proxy is taking over"
    return None


async def _registered_workload(proxy: Proxy, key: str) -> Workload:
    """The workload once the control plane has its uid and IPs (the agent registers them)."""
    for _ in range(int(POD_WAIT_SECONDS / POD_POLL_SECONDS)):
        workload = proxy.snapshot.workloads.get(key)
        if workload is not None and workload.uid and workload.ips:
            return workload
        await asyncio.sleep(POD_POLL_SECONDS)
    raise TransientError(f"the control plane does not know pod {key} (uid and IPs) yet")
