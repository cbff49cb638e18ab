"""Per-pod eBPF capture: fill the maps, link sk_lookup into the pod, register the proxy.

The node-wide programs are installed on first use (`loader.install`); after
that, everything here works from the pins alone, so a restarted agent picks
up where the last one stopped without reloading anything.

Apply, for one pod netns (identified by its netns cookie): links sk_lookup
into the netns; writes the port and CIDR exclusions and the pod's addresses,
then the pod entry that turns capture on; and registers the proxy's 15006
listeners in weir_listeners. Remove does the reverse, pod entry first, so
capture stops before its exclusions go. A failure part-way leaves entries
that the next apply or remove converges, or prune once the netns is gone;
nothing outside this pod's entries is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from node_agent import libc, netns
from node_agent.constants import INBOUND_PLAINTEXT_CAPTURE_PORT
from node_agent.netns import Netns
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.ebpf import loader, sys_bpf
from node_agent.redirect.ebpf.maps import (
    MAP_SPECS,
    POD_CONFIG_MAPS,
    Entries,
    MapName,
    describe,
    encode_listener_key,
    key_cookie,
    plan,
    pod_entries,
)
from node_agent.redirect.ebpf.pins import PinLayout, cgroup2_root, parse_mountinfo
from node_agent.redirect.podnet import (
    TCP_LISTEN,
    TcpSocket,
    netns_cookie,
    pod_addresses,
    tcp_sockets,
)
from weir_common.errors import NodeSetupError, TransientError

log = logging.getLogger(__name__)

_SOCKET_FAMILIES: Final = {4: socket.AF_INET, 6: socket.AF_INET6}

# Every map holding entries of one pod, in the order they are deleted: the
# pod entry first, so capture stops at once.
_POD_MAPS: Final = (*reversed(POD_CONFIG_MAPS), MapName.LISTENERS)
PodKeys = dict[MapName, list[bytes]]


def live_netns_cookies() -> set[int]:
    """Cookies of every network namespace a process or a bind mount still holds.

    Bind mounts (`ip netns add`, a container runtime's /run/netns/cni-*) are
    looked for in every mount namespace on the node, not only the agent's,
    through /proc/PID/root of one process of each.
    """
    holders: dict[int, Path] = {}  # netns inode -> a path that opens it
    mount_namespaces: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # the process exited meanwhile
            net = proc / "ns" / "net"
            holders.setdefault(net.stat().st_ino, net)
            mnt = (proc / "ns" / "mnt").stat().st_ino
            if mnt in mount_namespaces:
                continue
            mount_namespaces.add(mnt)
            for m in parse_mountinfo((proc / "mountinfo").read_text()):
                if m.fstype == "nsfs":
                    path = proc / "root" / m.mount_point.relative_to("/")
                    with contextlib.suppress(OSError):
                        holders.setdefault(path.stat().st_ino, path)
    cookies = set()
    for inode, path in holders.items():
        # Gone meanwhile, or a namespace of another kind (setns refuses it).
        with contextlib.suppress(TransientError, OSError):
            cookies.add(netns_cookie(Netns(path, inode)))
    return cookies


def _socket_owners(inodes: set[int]) -> dict[int, tuple[int, int]]:
    """inode -> (pid, fd) of a process holding that socket, scanning /proc like ss -p."""
    owners: dict[int, tuple[int, int]] = {}
    pids = [os.getpid()] + [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    for pid in pids:
        with contextlib.suppress(OSError):
            for entry in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = str(Path(entry.path).readlink())
                    if target.startswith("socket:["):
                        inode = int(target[8:-1])
                        if inode in inodes and inode not in owners:
                            owners[inode] = (pid, int(entry.name))
        if len(owners) == len(inodes):
            break
    return owners


@dataclass(frozen=True)
class EbpfApplyReport:
    netns_cookie: int
    install: str  # what installing the node-wide part did (or that it was there)
    changed: bool
    linked: bool  # sk_lookup was linked into the netns now
    listeners: tuple[int, ...]  # families whose 15006 listener is registered
    missing_listeners: tuple[int, ...]

    def lines(self) -> list[str]:
        out = [f"eBPF: {self.install}", f"netns cookie: {self.netns_cookie}"]
        out.append("pod maps: " + ("updated" if self.changed else "already in place"))
        out.append("inbound sk_lookup: " + ("linked" if self.linked else "already linked"))
        out += [f"IPv{f}: proxy listener on 15006 registered" for f in self.listeners]
        out += [
            f"IPv{f}: no proxy listener on 15006 yet; inbound IPv{f} connections are refused "
            "until apply runs again after the proxy listens"
            for f in self.missing_listeners
        ]
        return out


@dataclass
class EbpfCapture:
    """Capture through the programs pinned under `pins`; same contract as IptablesCapture."""

    pins: PinLayout = field(default_factory=PinLayout)
    # A compile done by a preflight, handed over so install does not compile again.
    precompiled: loader.Compiled | None = None
    _fds: dict[MapName, int] = field(default_factory=dict)

    def close(self) -> None:
        """Close our map fds (uninstall frees maps only once nobody holds one)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.precompiled is not None:
            self.precompiled.close()
            self.precompiled = None

    def __enter__(self) -> EbpfCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maps --------------------------------------------------------------

    def _map(self, name: MapName) -> int:
        if not self._fds:
            loader.require_compatible(self.pins)
        if name not in self._fds:
            try:
                self._fds[name] = sys_bpf.obj_get(str(self.pins.map(name.value)))
            except FileNotFoundError:
                raise NodeSetupError(
                    f"eBPF map {name} is not pinned at {self.pins.map(name.value)} "
                    "(not installed, or removed by uninstall-ebpf)"
                ) from None
        return self._fds[name]

    def _entries(self, name: MapName, cookie: int) -> Entries:
        fd = self._map(name)
        info = sys_bpf.map_info(fd)
        out: Entries = {}
        for key in list(sys_bpf.map_keys(fd, info.key_size)):
            value = sys_bpf.map_lookup(fd, key, info.value_size)
            if value is not None and key_cookie(name, key, value) == cookie:
                out[key] = value
        return out

    # -- the CaptureMode interface -----------------------------------------

    def install(self) -> loader.InstallReport:
        compiled, self.precompiled = self.precompiled, None
        return loader.install(self.pins, compiled)

    def apply(self, ns: Netns, config: CaptureConfig) -> EbpfApplyReport:
        installed = self.install()
        cookie = netns_cookie(ns)
        # The link before any entry, so every pod with entries has a link that
        # tells prune whether its netns still exists.
        linked = self._link_sk_lookup(ns, cookie)
        desired = pod_entries(cookie, config, pod_addresses(ns))
        changed = False
        for name in POD_CONFIG_MAPS:
            p = plan(desired[name], self._entries(name, cookie))
            fd = self._map(name)
            for key, value in p.update.items():
                try:
                    sys_bpf.map_update(fd, key, value)
                except OSError as e:
                    raise TransientError(
                        f"cannot write {name} for {ns.path}: {e.strerror} (map full?)"
                    ) from None
            for key in p.delete:
                sys_bpf.map_delete(fd, key)
            changed |= not p.empty
        registered = self._register_listeners(ns, cookie)
        families = {ip.version for ip in pod_addresses(ns)}
        return EbpfApplyReport(
            cookie,
            installed.detail,
            changed,
            linked,
            tuple(sorted(registered)),
            tuple(sorted(families - registered)),
        )

    def remove(self, ns: Netns) -> bool:
        """Stop capture for the pod and drop all its entries. Whether anything was removed."""
        if loader.install_state(self.pins).absent:
            return False
        cookie = netns_cookie(ns)
        entries, link = self._forget(cookie, self._pod_keys().get(cookie, {}))
        return entries > 0 or link

    def forget(self, netns_cookie: int) -> bool:
        """Drop the entries and link of a pod whose netns is gone, by the cookie it had.

        Its netns may live on in the kernel for a while (a proxy's sockets hold
        it), so the link is not detached yet and prune would keep it; the pod's
        owner knows it is gone. Whether anything was there.
        """
        if loader.install_state(self.pins).absent:
            return False
        entries, link = self._forget(netns_cookie, self._pod_keys().get(netns_cookie, {}))
        return entries > 0 or link

    def _pod_keys(self) -> dict[int, PodKeys]:
        """The keys of every per-pod entry, by the netns cookie they belong to."""
        found: dict[int, PodKeys] = {}
        for name in _POD_MAPS:
            fd = self._map(name)
            spec = MAP_SPECS[name]
            for key in list(sys_bpf.map_keys(fd, spec.key_size)):
                value = sys_bpf.map_lookup(fd, key, spec.value_size)
                if value is not None:
                    cookie = key_cookie(name, key, value)
                    found.setdefault(cookie, {}).setdefault(name, []).append(key)
        return found

    def _forget(self, cookie: int, keys: PodKeys) -> tuple[int, bool]:
        """Delete these entries of one pod, then its link: (entries deleted, link removed)."""
        deleted = 0
        for name in _POD_MAPS:
            fd = self._map(name)
            deleted += sum(sys_bpf.map_delete(fd, key) for key in keys.get(name, []))
        link = self.pins.pod_link(cookie)
        try:
            link.unlink()
        except FileNotFoundError:
            return deleted, False
        return deleted, True

    def prune(self) -> list[str]:
        """Forget every pod whose netns is gone: its map entries and its sk_lookup link.

        Returns one line per pod removed. A pod with a link is judged by it (the
        kernel detaches a netns link when the netns goes); entries without a
        link (an apply cut short, an older agent) by whether any process or
        bind mount on the node still holds a netns with that cookie. The
        connection maps are LRU and age out by themselves.
        """
        if loader.install_state(self.pins).absent:
            return []
        # Entries before links: apply links first, so a pod whose entries are
        # seen here already shows its link below.
        keys = self._pod_keys()
        links = self.pins.pod_links()
        gone = {cookie for cookie, path in links.items() if self._netns_gone(path)}
        unlinked = keys.keys() - links.keys()
        if unlinked:
            gone |= unlinked - live_netns_cookies()
        removed = []
        for cookie in sorted(gone):
            entries, link = self._forget(cookie, keys.get(cookie, {}))
            what = f"{entries} map entries" + (" and its sk_lookup link" if link else "")
            removed.append(f"pod netns cookie {cookie} (netns gone): removed {what}")
            log.info("eBPF prune: %s", removed[-1])
        return removed

    @staticmethod
    def _netns_gone(link: Path) -> bool:
        try:
            fd = sys_bpf.obj_get(str(link))
        except FileNotFoundError:
            return False  # removed meanwhile, by that pod's remove
        try:
            return sys_bpf.link_info(fd).target == 0
        finally:
            os.close(fd)

    def check(self, ns: Netns, config: CaptureConfig) -> list[str]:
        """What differs from a fully working capture of this pod; empty when none."""
        state = loader.install_state(self.pins)
        incompatible = [] if state.absent else loader.incompatibilities(self.pins)
        if incompatible:
            return [f"eBPF pins at {self.pins.root} are incompatible: {i}" for i in incompatible]
        if not state.installed:
            missing = ", ".join(str(p.relative_to(self.pins.root)) for p in state.missing)
            return [f"eBPF programs not installed at {self.pins.root} (missing: {missing})"]
        problems = self._check_node_programs()
        cookie = netns_cookie(ns)
        addresses = pod_addresses(ns)
        desired = pod_entries(cookie, config, addresses)
        for name in POD_CONFIG_MAPS:
            current = self._entries(name, cookie)
            p = plan(desired[name], current)
            problems += [f"missing: {describe(name, k, v)}" for k, v in p.update.items()]
            problems += [f"unexpected: {describe(name, k, current[k])}" for k in p.delete]
        problems += self._check_pod_link(ns, cookie)
        listeners = self._map(MapName.LISTENERS)
        for family in sorted({ip.version for ip in addresses}):
            key = encode_listener_key(cookie, _SOCKET_FAMILIES[family])
            dual = encode_listener_key(cookie, socket.AF_INET6)
            if sys_bpf.map_lookup(listeners, key, 8) is None and (
                family == 6 or sys_bpf.map_lookup(listeners, dual, 8) is None
            ):
                problems.append(
                    f"IPv{family}: no proxy listener on {INBOUND_PLAINTEXT_CAPTURE_PORT} "
                    "registered: inbound connections are refused (re-apply once the proxy listens)"
                )
        return problems

    # -- pieces ------------------------------------------------------------

    def _check_node_programs(self) -> list[str]:
        problems = []
        root = cgroup2_root()
        cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for p in loader.PROGRAMS:
                if not p.node_wide:
                    continue
                fd = sys_bpf.obj_get(str(self.pins.link(p.func)))
                try:
                    info = sys_bpf.link_info(fd)
                finally:
                    os.close(fd)
                if info.prog_id not in sys_bpf.effective_prog_ids(cgroup_fd, p.attach_type):
                    problems.append(
                        f"{p.func} (prog id {info.prog_id}) is linked but not effective at {root}"
                    )
        finally:
            os.close(cgroup_fd)
        return problems

    def _check_pod_link(self, ns: Netns, cookie: int) -> list[str]:
        path = self.pins.pod_link(cookie)
        if not path.exists():
            return ["inbound sk_lookup is not linked into this netns"]
        fd = sys_bpf.obj_get(str(path))
        try:
            info = sys_bpf.link_info(fd)
        finally:
            os.close(fd)
        if info.target != ns.inode:
            return [f"inbound sk_lookup link points at netns inode {info.target}, not {ns.inode}"]
        return []

    def _link_sk_lookup(self, ns: Netns, cookie: int) -> bool:
        path = self.pins.pod_link(cookie)
        if path.exists():
            return False
        prog_fd = sys_bpf.obj_get(str(self.pins.prog(loader.SK_LOOKUP.func)))
        try:
            ns_fd = netns.open_fd(ns)
            try:
                link_fd = sys_bpf.link_create(prog_fd, ns_fd, sys_bpf.AttachType.SK_LOOKUP)
            finally:
                os.close(ns_fd)
        finally:
            os.close(prog_fd)
        try:
            sys_bpf.obj_pin(link_fd, str(path))
        finally:
            os.close(link_fd)
        return True

    def _register_listeners(self, ns: Netns, cookie: int) -> set[int]:
        """Put the proxy's 15006 listeners of this netns in weir_listeners; families done."""
        found = [
            s
            for s in tcp_sockets(ns)
            if s.state == TCP_LISTEN and s.local[1] == INBOUND_PLAINTEXT_CAPTURE_PORT
        ]
        owners = _socket_owners({lst.inode for lst in found})
        listeners = self._map(MapName.LISTENERS)
        done: set[int] = set()
        for lst in found:
            if lst.family in done or lst.inode not in owners:
                continue
            fd = libc.pidfd_getfd(*owners[lst.inode])
            try:
                key = encode_listener_key(cookie, _SOCKET_FAMILIES[lst.family])
                sys_bpf.map_update(listeners, key, struct.pack("<Q", fd))
            finally:
                os.close(fd)
            done.add(lst.family)
        if 6 in done and 4 not in done:
            # sk_lookup falls back to the IPv6 listener, which serves IPv4 unless v6only.
            done |= {4} if self._dual_stack(found, owners) else set()
        return done

    @staticmethod
    def _dual_stack(found: list[TcpSocket], owners: dict[int, tuple[int, int]]) -> bool:
        for lst in found:
            if lst.family == 6 and lst.inode in owners:
                fd = libc.pidfd_getfd(*owners[lst.inode])
                with socket.socket(fileno=fd) as s:
                    return s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        return False
