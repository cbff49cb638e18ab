"""A throwaway cluster of network namespaces: an underlay, nodes, and pods.

```
   underlay netns  <prefix>-underlay          (forwards, but has no default route)
     bridge <prefix>ul: router .1 / ::1, a route to every node's pod CIDRs
       |  veth <prefix>u<i> ... <prefix>n<i>
   node netns  <prefix>-node-<name>            (ip_forward; default route -> underlay)
     bridge <prefix>br = pod gateway, made by the bridge CNI plugin run in here
       |  veth (made by the plugin)
   pod netns  <prefix>-pod-<namespace>-<name>  (eth0 from host-local)
```

Pods are wired exactly as a runtime on a Kubernetes node wires them: the
node's conflist (bridge + host-local, plus any chained plugin) runs through
`cni_runtime.invoke_chain` with the plugins forked inside the node's netns, so
the bridge and the host ends of the veths live in the node, never in the host.
Nodes reach each other's pods by routes over the underlay. Traffic for any
other address goes node -> underlay and dies there with an ICMP unreachable:
nothing is wired to the host's namespace, so nothing can leave the machine.

Every netns, named link and temp directory starts with the topology's prefix,
so `sweep(prefix)` finds what a crashed run left behind. A LocalTopology is
not thread-safe; its pods' sockets and commands may be used from any thread.
The namespaces, links and routes themselves are made by `wiring` (netlink).
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, TypeVar

from node_agent import netns as netns_mod
from node_agent.localmesh import wiring
from node_agent.localmesh.cni_runtime import invoke_chain
from node_agent.localmesh.conflists import node_conflist
from node_agent.localmesh.sockets import open_connection, open_listener
from node_agent.localmesh.sweep import PREFIX_ROOT, CleanupError, sweep
from node_agent.localmesh.wiring import NETNS_DIR, NO_DAD, Route
from node_agent.netns import Netns
from weir_common.errors import InvalidInputError, NodeSetupError, WeirError

# NETNS_DIR, node_conflist and open_connection live in wiring, conflists and
# sockets; testbed/k8s_cluster still imports them from here.
__all__ = [
    "CNI_BIN_DIR",
    "DEFAULT_UNDERLAY_V4",
    "DEFAULT_UNDERLAY_V6",
    "NETNS_DIR",
    "POD_IFNAME",
    "LocalTopology",
    "Node",
    "Pod",
    "node_conflist",
    "open_connection",
]

CNI_BIN_DIR: Final = Path("/usr/lib/cni")
POD_IFNAME: Final = "eth0"
DEFAULT_UNDERLAY_V4: Final = IPv4Network("10.250.0.0/24")
DEFAULT_UNDERLAY_V6: Final = IPv6Network("fd10:250::/64")
_DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_IFNAMSIZ: Final = 15
_DEFAULT_V4: Final = IPv4Network("0.0.0.0/0")
_DEFAULT_V6: Final = IPv6Network("::/0")
_FORWARDING: Final = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1", **NO_DAD}


@dataclass(frozen=True, eq=False)
class Node:
    """A node: its netns, its address on the underlay, the pod CIDRs it owns."""

    name: str
    netns_name: str
    netns: Netns
    uplink: str
    underlay_ipv4: IPv4Address
    underlay_ipv6: IPv6Address
    pod_cidr_v4: IPv4Network
    pod_cidr_v6: IPv6Network | None
    bridge: str
    chained_plugins: tuple[dict[str, Any], ...]

    def run(
        self, argv: Sequence[str], stdin: str | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's netns (never raises on exit code)."""
        return netns_mod.run(self.netns, argv, stdin, timeout)


@dataclass(frozen=True, eq=False)
class Pod:
    """A pod sandbox: its netns, the addresses host-local gave it, the CNI result."""

    name: str
    namespace: str
    uid: str
    node: Node
    container_id: str
    netns_name: str
    netns: Netns
    ipv4: IPv4Address
    ipv6: IPv6Address | None
    cni_args: dict[str, str]
    conflist: dict[str, Any]
    cni_result: dict[str, Any] = field(repr=False)

    @property
    def netns_path(self) -> Path:
        return self.netns.path

    def run(
        self, argv: Sequence[str], stdin: str | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the pod's netns (never raises on exit code)."""
        return netns_mod.run(self.netns, argv, stdin, timeout)

    def listen(self, port: int = 0, *, ipv6: bool = False) -> socket.socket:
        """A TCP listener on the pod's own IPv4 (or IPv6) address."""
        if ipv6:
            if self.ipv6 is None:
                raise InvalidInputError(f"pod {self.namespace}/{self.name} has no IPv6 address")
            return open_listener(self.netns, self.ipv6, port)
        return open_listener(self.netns, self.ipv4, port)

    def connect(
        self, address: IPv4Address | IPv6Address, port: int, timeout: float = 5.0
    ) -> socket.socket:
        """A TCP connection from inside the pod."""
        return open_connection(self.netns, address, port, timeout)


def _check_name(kind: str, name: str) -> None:
    if not _DNS_LABEL.match(name):
        raise InvalidInputError(f"{kind} name {name!r} is not a DNS label ([a-z0-9-], 1-63)")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them.

    A second Ctrl-C during cleanup would otherwise abort the cleanup it asked for.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


class LocalTopology:
    """Underlay, nodes and pods in namespaces; `with` it, or call `close()`.

    Entering creates the underlay. Ctrl-C (KeyboardInterrupt) unwinds through
    `close()`; SIGTERM does too only if the process that owns the topology
    turns it into SystemExit, as `weir demo` does: a library does not take
    over a process-wide signal.
    """

    def __init__(
        self,
        *,
        cni_path: Sequence[Path] = (CNI_BIN_DIR,),
        underlay_v4: IPv4Network = DEFAULT_UNDERLAY_V4,
        underlay_v6: IPv6Network = DEFAULT_UNDERLAY_V6,
    ) -> None:
        self.prefix = f"{PREFIX_ROOT}{secrets.token_hex(3)}"
        self.cni_path = list(cni_path)
        self.underlay_v4 = underlay_v4
        self.underlay_v6 = underlay_v6
        self._work_dir: Path | None = None
        self._underlay: Netns | None = None
        self._nodes: dict[str, Node] = {}
        self._pods: dict[tuple[str, str], Pod] = {}
        self._next_index = 0
        self._state = "new"

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> LocalTopology:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Create the work directory and the underlay; on failure, remove both."""
        if self._state != "new":
            raise InvalidInputError(f"topology {self.prefix} was already opened")
        self._state = "open"
        try:
            # The work dir comes first: sweep() finds a crashed run's dir by the prefix.
            self._work_dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
            underlay = wiring.create_netns(f"{self.prefix}-underlay")
            self._underlay = underlay
            wiring.set_sysctls(underlay, _FORWARDING)
            bridge = self._underlay_bridge
            v4_len, v6_len = self.underlay_v4.prefixlen, self.underlay_v6.prefixlen
            with wiring.links(underlay) as links:
                links.up("lo")
                links.add_bridge(bridge)
                links.up(bridge)
                links.add_address(bridge, IPv4Interface((self.router_v4, v4_len)))
                links.add_address(bridge, IPv6Interface((self.router_v6, v6_len)))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove everything; keep going past failures, then report them.

        Pods get a CNI DEL first, newest first, so plugins release what they
        hold (host-local addresses, later weir-cni's enrollment). Then
        sweep(prefix) deletes every netns (nodes, underlay, any pod a failed
        step left) and the work directory. Safe to call twice.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        failures: list[str] = []
        with _signals_deferred():
            for pod in reversed(list(self._pods.values())):
                try:
                    self.remove_pod(pod)
                except WeirError as e:
                    failures.append(e.message)
            self._nodes.clear()
            self._underlay = None
            self._work_dir = None
            try:
                sweep(self.prefix)
            except CleanupError as e:
                failures.append(e.message)
        if failures:
            raise CleanupError(f"topology {self.prefix}: " + "; ".join(failures))

    # -- properties ------------------------------------------------------

    @property
    def underlay(self) -> Netns:
        """The underlay's netns (where escaped traffic dies), for inspection."""
        return self._require_open()

    @property
    def work_dir(self) -> Path:
        """Our temp directory (host-local state lives under it)."""
        self._require_open()
        if self._work_dir is None:
            raise InvalidInputError(f"topology {self.prefix} has no work directory")
        return self._work_dir

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    @property
    def pods(self) -> list[Pod]:
        return list(self._pods.values())

    @property
    def _underlay_bridge(self) -> str:
        return f"{self.prefix}ul"

    @property
    def router_v4(self) -> IPv4Address:
        """The underlay's own address: where shared services (the control plane) listen."""
        return self.underlay_v4.network_address + 1

    @property
    def router_v6(self) -> IPv6Address:
        return self.underlay_v6.network_address + 1

    def _require_open(self) -> Netns:
        if self._state != "open" or self._underlay is None:
            raise InvalidInputError(f"topology {self.prefix} is not open")
        return self._underlay

    # -- nodes -----------------------------------------------------------

    def add_node(
        self,
        name: str,
        pod_cidr_v4: str | IPv4Network,
        pod_cidr_v6: str | IPv6Network | None = None,
        *,
        chained_plugins: Sequence[Mapping[str, Any]] = (),
    ) -> Node:
        """A node netns joined to the underlay, routing to every other node's pods.

        `chained_plugins` are appended to this node's conflist after bridge.
        On failure the node's netns is removed and other nodes are untouched.
        """
        underlay = self._require_open()
        _check_name("node", name)
        if name in self._nodes:
            raise InvalidInputError(f"node {name!r} already exists")
        v4 = _parse_cidr(pod_cidr_v4, IPv4Network)
        v6 = _parse_cidr(pod_cidr_v6, IPv6Network) if pod_cidr_v6 is not None else None
        taken: list[IPv4Network | IPv6Network] = [self.underlay_v4, self.underlay_v6]
        for other in self._nodes.values():
            taken.append(other.pod_cidr_v4)
            if other.pod_cidr_v6 is not None:
                taken.append(other.pod_cidr_v6)
        for cidr in (v4, v6):
            clash = next((t for t in taken if cidr is not None and _overlaps(cidr, t)), None)
            if clash is not None:
                raise InvalidInputError(f"pod CIDR {cidr} of node {name!r} overlaps {clash}")

        index = self._next_index
        self._next_index += 1
        ul_if, node_if = f"{self.prefix}u{index}", f"{self.prefix}n{index}"
        if len(ul_if) > _IFNAMSIZ:
            raise InvalidInputError(f"too many nodes: interface name {ul_if} is too long")
        ul_v4 = self.underlay_v4.network_address + 2 + index
        ul_v6 = self.underlay_v6.network_address + 2 + index
        if ul_v4 not in self.underlay_v4 or ul_v4 == self.underlay_v4.broadcast_address:
            raise InvalidInputError(f"underlay {self.underlay_v4} has no room for another node")

        netns_name = f"{self.prefix}-node-{name}"
        ns = wiring.create_netns(netns_name)
        node = Node(
            name=name,
            netns_name=netns_name,
            netns=ns,
            uplink=node_if,
            underlay_ipv4=ul_v4,
            underlay_ipv6=ul_v6,
            pod_cidr_v4=v4,
            pod_cidr_v6=v6,
            bridge=f"{self.prefix}br",
            chained_plugins=tuple(copy.deepcopy(dict(p)) for p in chained_plugins),
        )
        try:
            wiring.set_sysctls(ns, _FORWARDING)
            with wiring.links(underlay) as links:
                links.add_veth(ul_if, peer=node_if, peer_netns=ns)
                links.up(ul_if, master=self._underlay_bridge)
                links.add_routes(_pod_routes(node))
            others = list(self._nodes.values())
            with wiring.links(ns) as links:
                links.up("lo")
                links.up(node_if)
                links.add_address(node_if, IPv4Interface((ul_v4, self.underlay_v4.prefixlen)))
                links.add_address(node_if, IPv6Interface((ul_v6, self.underlay_v6.prefixlen)))
                # Anything not a pod goes to the underlay, which has no way on.
                links.add_route(_DEFAULT_V4, self.router_v4)
                links.add_route(_DEFAULT_V6, self.router_v6)
                links.add_routes([r for o in others for r in _pod_routes(o)])
            for other in others:
                wiring.add_routes(other.netns, _pod_routes(node))
        except BaseException:
            # Routes to this node's pods would block adding it again. Some were
            # never added; close()'s sweep is the backstop.
            unroute = [dst for dst, _ in _pod_routes(node)]
            for routed in (*(o.netns for o in self._nodes.values()), underlay):
                with contextlib.suppress(WeirError):
                    wiring.delete_routes(routed, unroute)
            # The veth dies with the node's netns, the underlay end along with it.
            with contextlib.suppress(WeirError):
                wiring.delete_netns(netns_name)
            raise
        self._nodes[name] = node
        return node

    # -- pods ------------------------------------------------------------

    def conflist(self, node: Node, *, dual_stack: bool = False) -> dict[str, Any]:
        """What this node's runtime finds in /etc/cni/net.d (also for a real runtime's conf dir)."""
        return node_conflist(
            network=f"localmesh-{node.name}",
            bridge=node.bridge,
            pod_cidr_v4=node.pod_cidr_v4,
            pod_cidr_v6=node.pod_cidr_v6 if dual_stack else None,
            ipam_data_dir=self.work_dir / "host-local" / node.name,
            chained_plugins=node.chained_plugins,
        )

    def add_pod(
        self, node: Node, name: str, namespace: str = "default", *, dual_stack: bool = False
    ) -> Pod:
        """Create a pod sandbox netns and run the node's conflist ADD for it.

        On failure the runtime's usual cleanup happens (CNI DEL, netns removed)
        and the plugin's CniPluginError is raised.
        """
        self._require_open()
        if self._nodes.get(node.name) is not node:
            raise InvalidInputError(f"node {node.name!r} is not part of topology {self.prefix}")
        _check_name("pod", name)
        _check_name("namespace", namespace)
        if (namespace, name) in self._pods:
            raise InvalidInputError(f"pod {namespace}/{name} already exists")
        if dual_stack and node.pod_cidr_v6 is None:
            raise InvalidInputError(f"node {node.name!r} has no IPv6 pod CIDR for a dual-stack pod")

        uid = str(uuid.uuid4())
        container_id = f"{self.prefix}-{namespace}-{name}"
        cni_args = {
            # What kubelet's runtimes pass; IgnoreUnknown lets plugins skip the K8S_* keys.
            "IgnoreUnknown": "1",
            "K8S_POD_NAMESPACE": namespace,
            "K8S_POD_NAME": name,
            "K8S_POD_INFRA_CONTAINER_ID": container_id,
            "K8S_POD_UID": uid,
        }
        conflist = self.conflist(node, dual_stack=dual_stack)
        netns_name = f"{self.prefix}-pod-{namespace}-{name}"
        ns = wiring.create_netns(netns_name)
        try:
            if dual_stack:
                wiring.set_sysctls(ns, NO_DAD)
            with wiring.links(ns) as links:
                links.up("lo")
            result = invoke_chain(
                conflist,
                "ADD",
                container_id=container_id,
                netns_path=ns.path,
                ifname=POD_IFNAME,
                cni_path=self.cni_path,
                cni_args=cni_args,
                netns=node.netns,
            )
            ipv4, ipv6 = _result_addresses(result, want_ipv6=dual_stack)
        except BaseException:
            # As a runtime does after a failed ADD: DEL (errors expected, ignored), then the netns.
            with contextlib.suppress(WeirError):
                invoke_chain(
                    conflist,
                    "DEL",
                    container_id=container_id,
                    netns_path=ns.path,
                    ifname=POD_IFNAME,
                    cni_path=self.cni_path,
                    cni_args=cni_args,
                    netns=node.netns,
                )
            with contextlib.suppress(WeirError):
                wiring.delete_netns(netns_name)
            raise
        pod = Pod(
            name=name,
            namespace=namespace,
            uid=uid,
            node=node,
            container_id=container_id,
            netns_name=netns_name,
            netns=ns,
            ipv4=ipv4,
            ipv6=ipv6,
            cni_args=cni_args,
            conflist=conflist,
            cni_result=result,
        )
        self._pods[(namespace, name)] = pod
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """CNI DEL (with the ADD result, as libcni's cache gives it), then delete the netns.

        The netns goes even if DEL failed; the DEL failure is raised afterwards.
        """
        if self._pods.get((pod.namespace, pod.name)) is not pod:
            raise InvalidInputError(f"pod {pod.namespace}/{pod.name} is not in this topology")
        del self._pods[(pod.namespace, pod.name)]
        try:
            self.delete_attachment(pod)
        finally:
            wiring.delete_netns(pod.netns_name)

    def delete_attachment(self, pod: Pod) -> None:
        """The CNI DEL a runtime runs for `pod` (with its ADD result), keeping the netns.

        Safe to repeat, as DEL must be; remove_pod runs it again before the netns goes.
        """
        invoke_chain(
            pod.conflist,
            "DEL",
            container_id=pod.container_id,
            netns_path=pod.netns.path,
            ifname=POD_IFNAME,
            cni_path=self.cni_path,
            cni_args=pod.cni_args,
            prev_result=pod.cni_result,
            netns=pod.node.netns,
        )


_Net = TypeVar("_Net", IPv4Network, IPv6Network)


def _parse_cidr(value: str | _Net, kind: type[_Net]) -> _Net:
    try:
        cidr = ipaddress.ip_network(value)
    except ValueError as e:
        raise InvalidInputError(f"bad pod CIDR {value!r}: {e}") from None
    if not isinstance(cidr, kind):
        raise InvalidInputError(f"pod CIDR {value!r} is not {kind.__name__[:4]}")
    return cidr


def _overlaps(a: IPv4Network | IPv6Network, b: IPv4Network | IPv6Network) -> bool:
    if isinstance(a, IPv4Network) and isinstance(b, IPv4Network):
        return a.overlaps(b)
    if isinstance(a, IPv6Network) and isinstance(b, IPv6Network):
        return a.overlaps(b)
    return False


def _pod_routes(node: Node) -> list[Route]:
    """Routes to `node`'s pod CIDRs over the underlay, for other nodes and the underlay."""
    routes: list[Route] = [(node.pod_cidr_v4, node.underlay_ipv4)]
    if node.pod_cidr_v6 is not None:
        routes.append((node.pod_cidr_v6, node.underlay_ipv6))
    return routes


def _result_addresses(
    result: Mapping[str, Any], *, want_ipv6: bool
) -> tuple[IPv4Address, IPv6Address | None]:
    """The pod's first IPv4 and IPv6 address from a CNI 1.0 result's `ips`."""
    v4: IPv4Address | None = None
    v6: IPv6Address | None = None
    for entry in result.get("ips", []):
        try:
            iface = ipaddress.ip_interface(entry["address"])
        except (KeyError, TypeError, ValueError):
            raise NodeSetupError(f"CNI result has a malformed IP entry: {entry!r}") from None
        if isinstance(iface.ip, IPv4Address) and v4 is None:
            v4 = iface.ip
        elif isinstance(iface.ip, IPv6Address) and v6 is None:
            v6 = iface.ip
    if v4 is None or (want_ipv6 and v6 is None):
        raise NodeSetupError(f"CNI result lacks the pod's addresses: {result.get('ips')!r}")
    return v4, v6
