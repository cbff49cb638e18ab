"""Enrolling a pod: capture, proxy handoff, registration; and undoing it.

The order matters and each step is undone if a later one fails, so a failed
ADD leaves the pod exactly as the primary CNI left it and the runtime's retry
starts clean:

    0. record it on disk as in flight       (undo: forget it)
    1. hand the pod to the proxy, acked     (undo: take it back)
    2. capture in the pod netns             (undo: remove it)
       then the node's SNAT rule for its kubelet probes, when the agent
       manages those (undo: remove it; redirect/host_probes.py)
    3. register the workload                (undo: deregister)
       or queue it while the control plane is unreachable: the proxy's ack
       in 1 already says it holds a certificate for the pod's identity
    4. record it on disk as enrolled        (the point of no return)

If the agent dies between 0 and 4, nothing is left to undo those steps in
this process; the next agent finds the in-flight record at start and undoes
them all (`converge`, deciding per record in reconcile.py), while the
runtime, told to retry, re-runs the ADD.

Both 1 and 2 finish before ADD returns, so no process of the pod ever runs
uncaptured or meets a proxy that is not listening yet. The proxy goes first
because eBPF inbound capture steers to the proxy's listening socket, which
must exist when capture is applied. DEL undoes them in reverse (capture
before the proxy's listeners) and never fails: every step is best effort
and idempotent, because a runtime that cannot delete a sandbox retries
forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, TypeVar

from cni_plugin.protocol import PodInfo
from node_agent.enrollment.reconcile import (
    Capture,
    NetnsNow,
    Start,
    capture_removal,
    on_start,
    same_netns,
)
from node_agent.enrollment.registry import PodRecord, PodRegistry
from node_agent.netns import Netns
from node_agent.proxy_handoff.protocol import EnrolledPod
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.podnet import netns_cookie
from weir_common.errors import WeirError

log = logging.getLogger(__name__)

T = TypeVar("T")


class CaptureEngine(Protocol):
    """A redirect mode (iptables or eBPF); blocking calls, run off the event loop."""

    def apply(self, ns: Netns, config: CaptureConfig) -> object: ...

    def check(self, ns: Netns, config: CaptureConfig) -> list[str]: ...

    def remove(self, ns: Netns) -> object: ...

    def forget(self, netns_cookie: int) -> object:
        """Drop what capture keeps outside a pod netns that is gone, by the netns's cookie."""
        ...

    def prune(self) -> list[str]:
        """Forget node-wide state of pods whose netns is gone; what was forgotten."""
        ...


class HostRules(Protocol):
    """Rules in the node's own netns that follow the enrolled pods (kubelet probes); blocking."""

    def add(self, uid: str, ips: Iterable[str]) -> None: ...

    def remove(self, uid: str) -> None: ...

    def converge(self) -> None:
        """Make the node's rules exactly those of the pods added (and not removed) since start."""
        ...


class ProxyHandoff(Protocol):
    async def add(self, pod: EnrolledPod, netns: Netns) -> None: ...

    async def remove(self, uid: str) -> None: ...


class EnrollmentMetrics(Protocol):
    """Where the Enroller counts what it does (node_agent/agent/metrics.py)."""

    def enrollment(self, outcome: str, seconds: float) -> None:
        """One `add` ended: "captured", "not_in_mesh" or "failed", after `seconds`."""
        ...

    def redirect_error(self, mode: str, operation: str) -> None:
        """A capture operation ("apply", "check", "remove", "forget", "prune") raised."""
        ...


class Registrar(Protocol):
    """Reports enrolled workloads to the control plane (local mode)."""

    async def register(self, record: PodRecord) -> None:
        """Report the pod, or queue it while the control plane is unreachable;
        raises only when the control plane refused it."""
        ...

    async def deregister(self, record: PodRecord) -> None: ...


@dataclass(frozen=True)
class MeshIntent:
    """What the mesh config says about a pod: its identity and how to capture it."""

    service_account: str
    capture: CaptureConfig = field(default_factory=CaptureConfig)


class WorkloadDirectory(Protocol):
    def lookup(self, namespace: str, name: str) -> MeshIntent | str:
        """The pod's intent, or the reason it stays out of the mesh."""
        ...


@dataclass(frozen=True)
class Outcome:
    captured: bool
    reason: str = ""


class EnrollmentError(WeirError):
    """Enrollment failed and was rolled back; `retryable` comes from the failing step."""


class Enroller:
    def __init__(
        self,
        *,
        capture: CaptureEngine,
        mode: str,
        proxy: ProxyHandoff,
        registrar: Registrar,
        directory: WorkloadDirectory,
        registry: PodRegistry,
        host_rules: HostRules | None = None,
        metrics: EnrollmentMetrics | None = None,
        boot_id: str | None = None,
    ) -> None:
        self._capture = capture
        # Which boot the netns inodes and cookies of new records belong to.
        self._boot_id = current_boot_id() if boot_id is None else boot_id
        self._metrics = metrics
        self._host_rules = host_rules
        self._mode = mode
        self._proxy = proxy
        self._registrar = registrar
        self._directory = directory
        self._registry = registry
        # ADD/DEL/CHECK for one sandbox never interleave; different pods proceed in parallel.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Pods whose capture could not be restored after a restart: reported, not hidden.
        self.unhealthy: dict[str, str] = {}

    async def add(self, pod: PodInfo) -> Outcome:
        started = time.monotonic()
        outcome = "failed"
        try:
            result = await self._add(pod)
            outcome = "captured" if result.captured else "not_in_mesh"
            return result
        finally:
            # A cancelled ADD (the CNI bound ran out) counts as failed too.
            if self._metrics is not None:
                self._metrics.enrollment(outcome, time.monotonic() - started)

    async def _add(self, pod: PodInfo) -> Outcome:
        async with self._locks[pod.container_id]:
            intent = self._directory.lookup(pod.namespace, pod.name)
            if isinstance(intent, str):
                log.info("pod %s stays out of the mesh: %s", pod.describe(), intent)
                return Outcome(captured=False, reason=intent)
            ns = Netns.validate(pod.netns)
            cookie = await asyncio.to_thread(_cookie_or_zero, ns)
            record = PodRecord(
                uid=pod.uid,
                namespace=pod.namespace,
                name=pod.name,
                service_account=intent.service_account,
                container_id=pod.container_id,
                netns=str(ns.path),
                netns_inode=ns.inode,
                ips=pod.ips,
                capture=intent.capture,
                mode=self._mode,
                enrolled=False,
                netns_cookie=cookie,
                boot_id=self._boot_id,
            )
            await self._enroll(record, ns, pod.describe())
            return Outcome(captured=True)

    async def _enroll(self, record: PodRecord, ns: Netns, what: str) -> None:
        undo: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        steps: list[
            tuple[str, Callable[[], Awaitable[object]], Callable[[], Awaitable[object]]]
        ] = [
            (
                "proxy handoff",
                lambda: self._proxy.add(_enrolled(record), ns),
                lambda: self._proxy.remove(record.uid),
            ),
            (
                "capture",
                lambda: self._redirect("apply", self._capture.apply, ns, record.capture),
                lambda: self._redirect("remove", self._capture.remove, ns),
            ),
            (
                "registration",
                lambda: self._registrar.register(record),
                lambda: self._registrar.deregister(record),
            ),
        ]
        host = self._host_rules
        if host is not None:
            # Before registration: a pod that peers can reach also passes its probes.
            steps.insert(
                2,
                (
                    "host probe rules",
                    lambda: asyncio.to_thread(host.add, record.uid, record.ips),
                    lambda: asyncio.to_thread(host.remove, record.uid),
                ),
            )
        await asyncio.to_thread(self._registry.put, record)
        try:
            for name, do, undo_step in steps:
                try:
                    await do()
                except WeirError as e:
                    error = EnrollmentError(f"enrolling {what} failed at {name}: {e.message}")
                    error.retryable = e.retryable
                    raise error from e
                undo.append((name, undo_step))
            await asyncio.to_thread(self._registry.put, dataclasses.replace(record, enrolled=True))
        except BaseException:
            rolled_back = True
            for name, undo_step in reversed(undo):
                try:
                    await undo_step()
                except WeirError as e:
                    rolled_back = False
                    log.error("rolling back %s of %s failed: %s", name, what, e.message)
            if rolled_back:
                await asyncio.to_thread(self._registry.remove, record.uid)
            else:
                # Kept as in flight, so the next converge retries the undo.
                self.unhealthy[record.uid] = "a failed enrollment could not be fully undone"
            raise
        self.unhealthy.pop(record.uid, None)
        log.info("enrolled %s (%s capture)", what, record.mode)

    async def delete(self, container_id: str) -> None:
        """Undo everything for a sandbox; never raises for a pod already gone."""
        async with self._locks[container_id]:
            record = self._registry.by_container(container_id)
            if record is None:
                return
            await self._unenroll(record)
        self._locks.pop(container_id, None)

    async def _unenroll(self, record: PodRecord) -> None:
        what = record.key()
        # Capture goes before the proxy's listeners, the reverse of ADD: a pod is never
        # captured without them, even if this agent dies between the two.
        ns = _look(record.netns)
        how = capture_removal(record, self._boot_id, _now(ns))
        try:
            if how == Capture.IN_NETNS and ns is not None:
                await self._redirect("remove", self._capture.remove, ns)
            elif how == Capture.BY_COOKIE:
                # The netns is gone (its rules with it), but eBPF state outside it is
                # not, and may still steer to a proxy that held this pod.
                await self._redirect("forget", self._capture.forget, record.netns_cookie)
        except WeirError as e:
            log.warning("removing capture from %s failed: %s", what, e.message)
        try:
            await self._proxy.remove(record.uid)
        except WeirError as e:
            # A proxy that is down gets the pod's absence in its next snapshot.
            log.warning("proxy did not take back %s: %s", what, e.message)
        if self._host_rules is not None:
            try:
                await asyncio.to_thread(self._host_rules.remove, record.uid)
            except WeirError as e:
                # Already forgotten: the next converge of the node's rules drops it.
                log.warning("removing the node's probe rule for %s failed: %s", what, e.message)
        try:
            await self._registrar.deregister(record)
        except WeirError as e:
            log.warning("deregistering %s failed: %s", what, e.message)
        await asyncio.to_thread(self._registry.remove, record.uid)
        self.unhealthy.pop(record.uid, None)
        log.info("unenrolled %s", what)

    async def gc(self, keep: frozenset[str]) -> None:
        """Unenroll every sandbox the runtime no longer has (CNI GC)."""
        for record in list(self._registry):
            if record.container_id not in keep:
                async with self._locks[record.container_id]:
                    await self._unenroll(record)

    async def check(self, container_id: str) -> list[str]:
        """Why the sandbox's capture is not as enrolled (empty when it is)."""
        record = self._registry.by_container(container_id)
        if record is None:
            return []
        ns = Netns.validate(record.netns)
        return await self._redirect("check", self._capture.check, ns, record.capture)

    async def converge(self) -> None:
        """After an agent restart or a new proxy: forget pods gone, repair the rest.

        A new proxy process opens new listening sockets; eBPF capture refers to
        them, so capture is re-checked (and re-applied) whenever a proxy synced.
        """
        await self._each_pod(self._converge_one)
        await self._prune_capture()
        await self._converge_host_rules()

    async def prune(self) -> None:
        """Forget pods whose netns went away without a DEL, and what capture kept of them.

        A runtime that crashes or a node that loses a sandbox never sends DEL;
        without this, their records and eBPF entries would pile up.
        """

        async def forget_if_gone(record: PodRecord) -> None:
            if record.enrolled and not self._same_netns(record):
                log.info("pod %s went away without a CNI DEL", record.key())
                await self._unenroll(record)

        await self._each_pod(forget_if_gone)
        await self._prune_capture()
        await self._converge_host_rules()

    async def _converge_host_rules(self) -> None:
        """Repair the node's rules, and drop those an earlier agent left for departed pods."""
        if self._host_rules is None:
            return
        try:
            await asyncio.to_thread(self._host_rules.converge)
        except WeirError as e:
            log.error("the node's kubelet probe rules could not be converged: %s", e.message)

    async def _each_pod(self, action: Callable[[PodRecord], Awaitable[None]]) -> None:
        """`action` on every recorded pod, each under its lock and as it is then."""
        for listed in list(self._registry):
            async with self._locks[listed.container_id]:
                # Re-read under the lock: an ADD or DEL may have changed it meanwhile.
                record = self._registry.get(listed.uid)
                if record is not None:
                    await action(record)

    async def _prune_capture(self) -> None:
        try:
            pruned = await self._redirect("prune", self._capture.prune)
        except WeirError as e:
            log.warning("pruning capture state of departed pods failed: %s", e.message)
            return
        for line in pruned:
            log.info("capture state of a departed pod removed: %s", line)

    async def _converge_one(self, record: PodRecord) -> None:
        ns = _look(record.netns)
        decision = on_start(record, self._boot_id, _now(ns))
        if decision.start == Start.UNDO:
            # ADD holds this pod's lock until its record is final, so an in-flight
            # record seen here belongs to an agent that died during that ADD.
            log.warning("undoing the half-done enrollment of %s: %s", record.key(), decision.why)
            await self._unenroll(record)
            return
        if decision.start == Start.FORGET or ns is None:
            log.info("forgetting pod %s: %s", record.key(), decision.why)
            await self._unenroll(record)
            return
        try:
            drift = await self._redirect("check", self._capture.check, ns, record.capture)
            if drift:
                log.warning("capture of %s drifted (%s); re-applying", record.key(), drift[0])
                await self._redirect("apply", self._capture.apply, ns, record.capture)
            if self._host_rules is not None:
                await asyncio.to_thread(self._host_rules.add, record.uid, record.ips)
        except WeirError as e:
            self.unhealthy[record.uid] = f"capture could not be restored: {e.message}"
            log.error("pod %s is NOT captured: %s", record.key(), e.message)
        else:
            self.unhealthy.pop(record.uid, None)

    async def _redirect(self, operation: str, call: Callable[..., T], *args: object) -> T:
        """A blocking capture call, off the event loop; a failure is counted, then raised."""
        try:
            return await asyncio.to_thread(call, *args)
        except Exception:
            if self._metrics is not None:
                self._metrics.redirect_error(self._mode, operation)
            raise

    def enrolled(self) -> list[tuple[EnrolledPod, Netns]]:
        """The proxy handoff snapshot: every recorded pod whose netns still exists."""
        out: list[tuple[EnrolledPod, Netns]] = []
        for record in self._registry:
            ns = _look(record.netns)
            if ns is not None and same_netns(record, self._boot_id, _now(ns)):
                out.append((_enrolled(record), ns))
        return out

    def _same_netns(self, record: PodRecord) -> bool:
        """Whether the pod's netns is still the one it was enrolled in (paths get reused)."""
        return same_netns(record, self._boot_id, _now(_look(record.netns)))

    def dump(self) -> list[dict[str, object]]:
        return [
            {
                **record.to_json(),
                "status": self.unhealthy.get(
                    record.uid, "captured" if record.enrolled else "enrolling"
                ),
            }
            for record in self._registry
        ]


BOOT_ID_FILE: Final = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id() -> str:
    """The kernel's id of this boot (the host's, also inside a container)."""
    return BOOT_ID_FILE.read_text().strip()


def _look(path: str) -> Netns | None:
    """The netns at `path` now, or None when there is none."""
    try:
        return Netns.validate(path)
    except WeirError:
        return None


def _now(ns: Netns | None) -> NetnsNow:
    return NetnsNow(ns.inode if ns is not None else None)


def _cookie_or_zero(ns: Netns) -> int:
    """The netns cookie, or 0 on a kernel without SO_NETNS_COOKIE (which iptables does not need)."""
    try:
        return netns_cookie(ns)
    except WeirError:
        return 0


def _enrolled(record: PodRecord) -> EnrolledPod:
    return EnrolledPod(
        uid=record.uid,
        name=record.name,
        namespace=record.namespace,
        service_account=record.service_account,
        ips=tuple(ip.split("/")[0] for ip in record.ips),
    )
