"""Namespaces, links, addresses and routes of the local mesh, over rtnetlink (pyroute2).

Namespaces are made as `ip netns add` makes them, a bind mount under
/var/run/netns, so `ip netns list`, the CNI plugins and the runtime tests all
see them (pyroute2 forks once per namespace created, to unshare in a child).
Links, addresses and routes go through an rtnetlink socket that a thread
opens while inside the target netns: a socket stays in the netns it was made
in, so configuring forks nothing (pyroute2's `IPRoute(netns=...)` would fork a
helper per socket).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Final

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from node_agent import netns as netns_mod
from node_agent.netns import Netns, entered
from weir_common.errors import InvalidInputError, NodeSetupError, TransientError

NETNS_DIR: Final = Path("/var/run/netns")
# A sysctl step takes milliseconds; this only bounds a hung one.
_STEP_TIMEOUT_S: Final = 10.0
_IFA_F_NODAD: Final = 0x02  # linux/if_addr.h

# Nobody else owns these addresses, so IPv6 DAD only costs time: the bridge
# plugin waits ~2 s for it on every dual-stack pod, and the gateway address it
# puts on a node's bridge stays unusable (cross-node IPv6 fails) until it ends.
NO_DAD: Final = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}

Route = tuple[IPv4Network | IPv6Network, IPv4Address | IPv6Address]


def _check_netns_name(name: str) -> None:
    # pyroute2 takes a name with a slash for a path (relative to the working
    # directory), where it would mount or unmount.
    if not name or "/" in name or name in (".", ".."):
        raise InvalidInputError(f"{name!r} is not a network namespace name")


def create_netns(name: str) -> Netns:
    """A new, empty named netns (/var/run/netns/NAME); an existing one is never reused."""
    _check_netns_name(name)
    try:
        pyroute2_netns.create(name)
    except FileExistsError:
        raise NodeSetupError(f"network namespace {name} already exists") from None
    except (OSError, RuntimeError) as e:
        # A failed create may leave the mount point behind; it is ours, the name being new.
        with contextlib.suppress(NodeSetupError):
            delete_netns(name)
        raise NodeSetupError(f"creating network namespace {name}: {e}") from None
    try:
        return Netns.validate(NETNS_DIR / name)
    except BaseException:
        with contextlib.suppress(NodeSetupError):
            delete_netns(name)
        raise


def delete_netns(name: str) -> None:
    """Unmount and unlink /var/run/netns/NAME, as `ip netns delete` does."""
    _check_netns_name(name)
    try:
        pyroute2_netns.remove(name)
    except OSError as e:
        raise NodeSetupError(f"deleting network namespace {name}: {e.strerror}") from None


def set_sysctls(ns: Netns, settings: Mapping[str, str]) -> None:
    argv = ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]
    proc = netns_mod.run(ns, argv, timeout=_STEP_TIMEOUT_S)
    if proc.returncode != 0:
        raise NodeSetupError(f"{' '.join(argv)} in {ns.path.name}: {proc.stderr.strip()}")


class Links:
    """Requests over one rtnetlink socket; a refusal raises NodeSetupError naming the step."""

    def __init__(self, ipr: IPRoute, where: str) -> None:
        self._ipr = ipr
        self._where = where
        # A lookup costs a request of its own; names are not reused within a session.
        self._indexes: dict[str, int] = {}

    def _request(self, step: str, request: Callable[[], object]) -> None:
        try:
            request()
        except NetlinkError as e:
            raise NodeSetupError(f"{step} in {self._where}: {os.strerror(e.code)}") from None

    def _index(self, ifname: str) -> int:
        if ifname not in self._indexes:
            found = self._ipr.link_lookup(ifname=ifname)
            if not found:
                raise NodeSetupError(f"no link {ifname} in {self._where}")
            self._indexes[ifname] = int(found[0])
        return self._indexes[ifname]

    def up(self, ifname: str, *, master: str | None = None) -> None:
        """Bring `ifname` up, first enslaving it to the bridge `master` if given."""
        attrs = {"master": self._index(master)} if master is not None else {}
        self._request(
            f"link set {ifname} up",
            lambda: self._ipr.link("set", ifname=ifname, state="up", **attrs),
        )

    def add_bridge(self, name: str) -> None:
        self._request(f"link add {name}", lambda: self._ipr.link("add", ifname=name, kind="bridge"))

    def add_veth(self, name: str, peer: str, peer_netns: Netns) -> None:
        """A veth pair whose `peer` end is created straight inside `peer_netns`."""
        try:
            fd = os.open(peer_netns.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TransientError(f"network namespace {peer_netns.path} disappeared") from None
        try:
            if os.fstat(fd).st_ino != peer_netns.inode:
                raise TransientError(f"{peer_netns.path} now names a different network namespace")
            self._request(
                f"link add {name} peer {peer}",
                lambda: self._ipr.link(
                    "add", ifname=name, kind="veth", peer={"ifname": peer, "net_ns_fd": fd}
                ),
            )
        finally:
            os.close(fd)

    def add_address(self, ifname: str, address: IPv4Interface | IPv6Interface) -> None:
        # No DAD (see NO_DAD): the sysctls cover addresses added later by the
        # plugins; an address we add ourselves says so on its own.
        flags = _IFA_F_NODAD if address.version == 6 else 0
        index = self._index(ifname)
        self._request(
            f"addr add {address} dev {ifname}",
            lambda: self._ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                flags=flags,
            ),
        )

    def add_route(self, dst: IPv4Network | IPv6Network, via: IPv4Address | IPv6Address) -> None:
        self._request(
            f"route add {dst} via {via}",
            lambda: self._ipr.route("add", dst=str(dst), gateway=str(via)),
        )

    def add_routes(self, routes: Sequence[Route]) -> None:
        for dst, via in routes:
            self.add_route(dst, via)

    def delete_link(self, ifname: str) -> None:
        self._request(f"link delete {ifname}", lambda: self._ipr.link("del", ifname=ifname))

    def delete_route(self, dst: IPv4Network | IPv6Network) -> None:
        """Remove the route to `dst`; one that is not there is no error."""
        try:
            self._ipr.route("del", dst=str(dst))
        except NetlinkError as e:
            if e.code != errno.ESRCH:
                raise NodeSetupError(
                    f"route del {dst} in {self._where}: {os.strerror(e.code)}"
                ) from None


@contextlib.contextmanager
def links(ns: Netns | None) -> Iterator[Links]:
    """An rtnetlink socket in `ns` (None: the caller's own netns), closed after the block."""
    with entered(ns) if ns is not None else contextlib.nullcontext():
        ipr = IPRoute()
    try:
        yield Links(ipr, ns.path.name if ns is not None else "the host")
    finally:
        ipr.close()


def add_routes(ns: Netns, routes: Sequence[Route]) -> None:
    with links(ns) as netns_links:
        netns_links.add_routes(routes)


def delete_routes(ns: Netns, destinations: Sequence[IPv4Network | IPv6Network]) -> None:
    """Try every destination, then raise what failed, if anything did."""
    failures: list[str] = []
    with links(ns) as netns_links:
        for dst in destinations:
            try:
                netns_links.delete_route(dst)
            except NodeSetupError as e:
                failures.append(e.message)
    if failures:
        raise NodeSetupError("; ".join(failures))


def delete_host_link(ifname: str) -> None:
    with links(None) as host:
        host.delete_link(ifname)
