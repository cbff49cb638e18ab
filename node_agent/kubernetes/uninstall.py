"""At SIGTERM on Kubernetes: an uninstall or an upgrade? For an uninstall, leave the node clean.

A rolling update, a drain or a deleted agent pod must leave capture in
place (the next agent takes the node over; pods never run uncaptured), while
`kubectl delete -k deploy/` must leave nothing of Weir on the node. Deciding
"uninstall" wrongly opens a window of uncaptured traffic, so only positive
evidence counts, and `decide` is a pure function of what the API server said:

- the agent's namespace has a deletionTimestamp, as the namespace watch saw
  it or as a GET at SIGTERM returns it (`kubectl delete -k` deletes the
  namespace first, before the ServiceAccount and RBAC, so the watch, whose
  stream was authorized when it started, sees it even once the token no
  longer works);
- the DaemonSet that owns the agent's pod (its controller ownerReference)
  is gone (404) or has a deletionTimestamp;
- every request was refused with 403: the token is valid (the ServiceAccount
  and the pod exist) but the agent's ClusterRoleBinding or ClusterRole is
  gone, which only an uninstall does (`kubectl apply` updates RBAC in place).
  A 403 next to an allowed request means the grants changed, not vanished:
  no evidence. Hence the agent's `get` on pods, daemonsets and namespaces is
  part of this contract: a version that drops one would look uninstalled to
  the agents it replaces.

A 401 alone is NOT evidence: the in-cluster token is bound to the agent's
pod, so a force-deleted agent pod (`--grace-period=0 --force`) gets 401 too
while its DaemonSet replaces it. Everything else (API unreachable, a
timeout, the DaemonSet there as before, a DaemonSet of the same name but
another UID, which will run the next agent) keeps capture in place.

The pod's name and namespace come from the downward API (env POD_NAME,
POD_NAMESPACE): the agent runs with hostNetwork, so its hostname is the
node's, not the pod's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from kubernetes.client import AppsV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException

from node_agent.enrollment.enroller import CaptureEngine, ProxyHandoff
from node_agent.enrollment.registry import PodRegistry
from node_agent.kubernetes.watch import ListWatch, Obj
from node_agent.netns import Netns
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import PinLayout
from node_agent.redirect.host_probes import HOST_PROBES_CHAIN, remove_host_probes
from weir_common.errors import WeirError
from weir_common.futures import settle

log = logging.getLogger(__name__)

# The pod's terminationGracePeriodSeconds is 30: the check and the cleanup
# together stay well inside it, leaving the rest of the shutdown its time.
CHECK_TIMEOUT_S: Final = 5.0
CLEANUP_BUDGET_S: Final = 20.0
# Handing the pods back to a proxy that is itself going away is best effort.
PROXY_HANDBACK_S: Final = 3.0
NAMESPACE_WATCH: Final = "agent namespace"
_OK: Final = 200
_UNAUTHORIZED: Final = 401
_FORBIDDEN: Final = 403
_NOT_FOUND: Final = 404


# -- the decision (pure) -----------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One GET: the HTTP status and object, or status None when no answer came."""

    status: int | None
    obj: Obj | None = None
    error: str = ""

    def describe(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        return str(self.status) + (f" {self.error}" if self.error else "")


@dataclass(frozen=True)
class Evidence:
    namespace: str
    pod: str
    # The namespace as the watch last saw it (None: never seen).
    watched_namespace: Obj | None
    # None: not asked (the deadline passed first, or nothing to ask about).
    namespace_answer: Answer | None
    pod_answer: Answer | None
    daemonset_answer: Answer | None


@dataclass(frozen=True)
class Verdict:
    uninstall: bool
    reason: str


def _meta(obj: Obj | None) -> Mapping[str, Any]:
    meta = (obj or {}).get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _deleting(obj: Obj | None) -> bool:
    return bool(_meta(obj).get("deletionTimestamp"))


def daemonset_owner(pod: Obj) -> tuple[str, str] | None:
    """(name, uid) of the DaemonSet controlling the pod, from its ownerReferences."""
    for ref in _meta(pod).get("ownerReferences") or ():
        if (
            isinstance(ref, Mapping)
            and ref.get("controller")
            and ref.get("kind") == "DaemonSet"
            and str(ref.get("apiVersion", "")).startswith("apps/")
        ):
            return str(ref.get("name", "")), str(ref.get("uid", ""))
    return None


def decide(e: Evidence) -> Verdict:
    """Uninstall only on positive evidence (see the module docstring); else keep capture."""
    return _namespace_verdict(e) or _daemonset_verdict(e) or _refusal_verdict(e)


def _namespace_verdict(e: Evidence) -> Verdict | None:
    ns = e.namespace_answer
    if _deleting(e.watched_namespace):
        return Verdict(True, f"namespace {e.namespace} is being deleted (seen by its watch)")
    if ns is not None and ns.status == _OK and _deleting(ns.obj):
        return Verdict(True, f"namespace {e.namespace} is being deleted")
    return None


def _daemonset_verdict(e: Evidence) -> Verdict | None:
    pod, ds = e.pod_answer, e.daemonset_answer
    if pod is None or pod.status != _OK:
        return None
    owner = daemonset_owner(pod.obj or {})
    if owner is None:
        return Verdict(False, f"pod {e.namespace}/{e.pod} is not run by a DaemonSet")
    name, uid = owner
    what = f"DaemonSet {e.namespace}/{name}"
    if ds is None or ds.status != _OK:
        gone = ds is not None and ds.status == _NOT_FOUND
        return Verdict(True, f"{what} is gone") if gone else None
    if str(_meta(ds.obj).get("uid", "")) != uid:
        return Verdict(False, f"{what} was replaced by a new one, whose agent takes the node over")
    if _deleting(ds.obj):
        return Verdict(True, f"{what} is being deleted")
    return Verdict(False, f"{what} is in place (a rolling update, a drain or a pod restart)")


def _refusal_verdict(e: Evidence) -> Verdict:
    asked = [
        (what, a)
        for what, a in (
            ("namespace", e.namespace_answer),
            ("pod", e.pod_answer),
            ("DaemonSet", e.daemonset_answer),
        )
        if a is not None
    ]
    said = "; ".join(f"{what}: {a.describe()}" for what, a in asked) or "nothing asked"
    if asked and all(a.status == _FORBIDDEN for _, a in asked):
        return Verdict(
            True, f"the agent's RBAC grants are gone: every request was refused ({said})"
        )
    if any(a.status == _UNAUTHORIZED for _, a in asked):
        return Verdict(
            False, f"401 is no evidence: a force-deleted agent pod's token is refused too ({said})"
        )
    return Verdict(False, f"no evidence of an uninstall ({said})")


# -- asking the API server (adapter) ------------------------------------------


class UninstallCheck:
    """Watches the agent's namespace while it runs; at SIGTERM asks about its DaemonSet."""

    def __init__(
        self,
        core: CoreV1Api,
        pod: str,
        namespace: str,
        *,
        timeout_s: float = CHECK_TIMEOUT_S,
        apps: AppsV1Api | None = None,
    ) -> None:
        self.pod = pod
        self.namespace = namespace
        self._core = core
        self._apps = apps or AppsV1Api(core.api_client)
        self._timeout_s = timeout_s
        self._watched: Obj | None = None
        self._lock = threading.Lock()
        self.watch = ListWatch(
            NAMESPACE_WATCH,
            core.list_namespace,
            self,
            field_selector=f"metadata.name={namespace}",
        )

    # WatchSink, on the watch's thread. A DELETED event carries the last state,
    # which had its deletionTimestamp (namespaces are finalized before they go).
    def replace(self, kind: str, objects: Sequence[Obj]) -> None:  # noqa: ARG002 - WatchSink
        with self._lock:
            self._watched = objects[0] if objects else None

    def event(self, kind: str, event_type: str, obj: Obj) -> None:  # noqa: ARG002 - WatchSink
        with self._lock:
            self._watched = obj

    async def verdict(self) -> Verdict:
        """The decision within the timeout; answers that did not come in time are not asked."""
        answers: dict[str, Answer] = {}
        deadline = time.monotonic() + self._timeout_s
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def body() -> None:
            try:
                self._ask(answers, deadline)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(settle, finished)

        # Its own daemon thread, not the loop's executor: a call stuck past its
        # timeout must not hold up the agent's exit.
        threading.Thread(target=body, name="uninstall check", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished, self._timeout_s)
        answers = dict(answers)  # what came in time; the thread may still add to it
        with self._lock:
            watched = self._watched
        return decide(
            Evidence(
                namespace=self.namespace,
                pod=self.pod,
                watched_namespace=watched,
                namespace_answer=answers.get("namespace"),
                pod_answer=answers.get("pod"),
                daemonset_answer=answers.get("daemonset"),
            )
        )

    def _ask(self, answers: dict[str, Answer], deadline: float) -> None:
        answers["namespace"] = _get(self._core.read_namespace, deadline, self.namespace)
        pod = _get(self._core.read_namespaced_pod, deadline, self.pod, self.namespace)
        answers["pod"] = pod
        owner = daemonset_owner(pod.obj or {}) if pod.status == _OK else None
        if owner is not None:
            answers["daemonset"] = _get(
                self._apps.read_namespaced_daemon_set, deadline, owner[0], self.namespace
            )


def _get(call: Any, deadline: float, *args: str) -> Answer:  # noqa: ANN401 - a client method
    left = deadline - time.monotonic()
    if left <= 0:
        return Answer(None, error="no time left")
    try:
        response = call(*args, _preload_content=False, _request_timeout=left)
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
    except ApiException as e:
        return Answer(e.status, error=str(e.reason or ""))
    except Exception as e:  # connection errors come in many types: all mean "no answer"
        return Answer(None, error=repr(e))
    return Answer(_OK, body if isinstance(body, Mapping) else None)


async def shutdown(
    check: UninstallCheck | None,
    quiesce: Callable[[], Awaitable[None]],
    cleanup: Callable[[], NodeCleanup],
) -> bool:
    """The agent's exit: decide, stop what could still enroll, clean up on an uninstall.

    `quiesce` runs whatever the verdict; the node is cleaned only after it, so
    nothing re-applies capture behind the cleanup. Whether Weir was removed.
    """
    verdict = await check.verdict() if check is not None else None
    if verdict is not None:
        log.warning(
            "shutdown: %s: %s",
            "UNINSTALL, removing Weir from the node" if verdict.uninstall else "keeping capture",
            verdict.reason,
        )
    await quiesce()
    if verdict is None or not verdict.uninstall:
        return False
    await cleanup().run()
    return True


# -- leaving the node clean -----------------------------------------------------


class CniUninstall(Protocol):
    def uninstall(self) -> list[str]:
        """Take weir-cni out of the node's CNI config and bin dir; what was removed."""
        ...


@dataclass
class NodeCleanup:
    """What an uninstall removes from the node; the agent's parts are stopped beforehand.

    The node's CNI config goes first (pods created from then on start without
    Weir, instead of failing on a socket nobody serves), then every recorded
    pod's capture (meshed pods keep running, uncaptured), then node-wide
    state. Workloads are not deregistered: the control plane is removed by
    the same uninstall, and on Kubernetes it follows pods through the API.
    """

    registry: PodRegistry
    capture: CaptureEngine
    proxy: ProxyHandoff
    cni: CniUninstall | None = None
    # eBPF pins to remove whatever the capture mode (a node that ran eBPF before).
    pins: PinLayout | None = None
    # The node's netns, for WEIR-HOST-PROBES; None: the agent's own.
    host_netns: Netns | None = None

    async def run(self, budget_s: float = CLEANUP_BUDGET_S) -> list[str]:
        """Everything that could be removed within `budget_s`; failures are logged, not raised."""
        done: list[str] = []
        deadline = time.monotonic() + budget_s
        if self.cni is not None:
            await self._step("weir-cni", done, self.cni.uninstall)
        uids = [record.uid for record in self.registry]
        for record in self.registry:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("uninstall: out of time; %s stays captured", record.key())
                continue
            try:
                ns = Netns.validate(record.netns)
            except WeirError:
                ns = None  # gone, and its rules with it
            if ns is not None and ns.inode == record.netns_inode:
                try:
                    await asyncio.wait_for(asyncio.to_thread(self.capture.remove, ns), left)
                except (WeirError, TimeoutError) as e:
                    log.error("uninstall: capture of %s not removed: %s", record.key(), e)
                    continue
            done.append(f"capture of {record.key()} removed")
        await self._hand_back(uids, deadline)
        await self._step("eBPF", done, self._remove_pins)
        await self._step(HOST_PROBES_CHAIN, done, self._remove_host_probes)
        await self._step("registry", done, self._remove_registry)
        for line in done:
            log.info("uninstall: %s", line)
        return done

    async def _step(self, what: str, done: list[str], step: Any) -> None:  # noqa: ANN401
        try:
            done += await asyncio.to_thread(step)
        except (WeirError, OSError) as e:
            log.error("uninstall: %s not removed: %s", what, e)

    async def _hand_back(self, uids: list[str], deadline: float) -> None:
        if not uids:
            return
        left = min(PROXY_HANDBACK_S, max(0.0, deadline - time.monotonic()))
        results = await asyncio.gather(
            *(asyncio.wait_for(self.proxy.remove(uid), left) for uid in uids),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.info("uninstall: %d pods not handed back to a proxy: %s", len(failed), failed[0])

    def _remove_pins(self) -> list[str]:
        if isinstance(self.capture, EbpfCapture):
            self.capture.close()  # the maps are freed only once no fd holds them
        if self.pins is None or not self.pins.root.exists():
            return []
        removed = loader.uninstall(self.pins)
        return [f"eBPF pins under {self.pins.root} removed ({len(removed)})"]

    def _remove_host_probes(self) -> list[str]:
        removed = remove_host_probes(self.host_netns)
        return [f"{HOST_PROBES_CHAIN} removed"] if removed else []

    def _remove_registry(self) -> list[str]:
        path: Path = self.registry.path
        if not path.exists():
            return []
        path.unlink()
        return [f"{path} removed"]
