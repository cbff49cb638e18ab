"""The agent following Kubernetes: its cache of this node's pods, the reconcile loop, the ADD gate.

- The pod watch (field selector spec.nodeName=<node>) and the namespace watch
  fill one cache, on the agent's event loop. Readiness waits for both lists.
- The reconcile loop runs `decisions.decide` for every pod of the node when a
  watch event or a mesh push arrives (within about a second) and every
  RESYNC_S anyway, and carries the decisions out through the Enroller, a
  few pods at a time. A pod to enroll that was not seen at its CNI ADD (it
  ran before the agent) is found in /proc (`discovery`); one whose sandbox
  cannot be told for sure is left alone and reported.
- As the Enroller's WorkloadDirectory, it answers "in the mesh, with which
  capture" from the membership rule, the mesh view and the annotations.
- `admit` is the CNI ADD's gate: a pod the membership rule puts in the mesh
  but the mesh view does not know yet (the control plane's push is on its
  way) waits a few seconds, then fails retryably, so it never starts
  uncaptured; a pod outside the mesh starts uncaptured at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from cni_plugin.protocol import PodInfo
from node_agent.enrollment.enroller import Enroller, MeshIntent
from node_agent.enrollment.registry import PodRegistry
from node_agent.kubernetes.annotations import capture_config
from node_agent.kubernetes.decisions import Enroll, Leave, Unenroll, decide, pod_annotations
from node_agent.kubernetes.discovery import (
    PodProcesses,
    ProcReader,
    Sandbox,
    find_sandbox,
    index_processes,
)
from node_agent.kubernetes.watch import Obj
from node_agent.mesh_view import MeshView
from node_agent.redirect.config import CaptureConfig
from weir_common.errors import TransientError, WeirError
from weir_common.kubernetes import outside_mesh

log = logging.getLogger(__name__)

PODS: Final = "pods"
NAMESPACES: Final = "namespaces"
# A full pass even when no event came: the safety net for a missed event or a failed step.
RESYNC_S: Final = 30.0
# Events that arrive together are handled in one pass.
COALESCE_S: Final = 0.1
# Pods enrolled or unenrolled at the same time by one pass.
CONCURRENCY: Final = 4
# How long an ADD waits for the watch to show the pod and the control plane to push it.
ADMISSION_WAIT_S: Final = 5.0
_POLL_S: Final = 0.1
# The interface the runtime names in every pod's ADD (the primary CNI's).
POD_INTERFACE: Final = "eth0"


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _key(pod: Obj) -> str:
    meta = _meta(pod)
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class PodFollower:
    def __init__(
        self,
        node: str,
        mesh: MeshView,
        registry: PodRegistry,
        proc: ProcReader,
        *,
        resync_s: float = RESYNC_S,
        admission_wait_s: float = ADMISSION_WAIT_S,
    ) -> None:
        self.node = node
        self._mesh = mesh
        self._registry = registry
        self._proc = proc
        self._resync_s = resync_s
        self._admission_wait_s = admission_wait_s
        # Set by the agent once built (the Enroller takes this follower as its directory).
        self.enroller: Enroller | None = None
        self._pods: dict[str, Obj] = {}  # uid -> pod
        self._namespaces: dict[str, Obj] = {}  # name -> namespace
        self._listed: set[str] = set()
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # "namespace/name" -> what the last pass did or found, for the admin API.
        self.status: dict[str, str] = {}
        mesh.on_change.append(self._changed.set)

    # -- the watches' side (WatchSink): called on their threads -------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def replace(self, kind: str, objects: Sequence[Obj]) -> None:
        self._attached().call_soon_threadsafe(self._replace, kind, objects)

    def event(self, kind: str, event_type: str, obj: Obj) -> None:
        self._attached().call_soon_threadsafe(self._event, kind, event_type, obj)

    def _attached(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("PodFollower.attach(loop) was not called before the watches")
        return self._loop

    def _replace(self, kind: str, objects: Sequence[Obj]) -> None:
        if kind == PODS:
            self._pods = {str(_meta(o).get("uid")): o for o in objects if self._on_node(o)}
        else:
            self._namespaces = {str(_meta(o).get("name")): o for o in objects}
        self._listed.add(kind)
        self._changed.set()

    def _event(self, kind: str, event_type: str, obj: Obj) -> None:
        table = self._pods if kind == PODS else self._namespaces
        key = str(_meta(obj).get("uid" if kind == PODS else "name"))
        if event_type == "DELETED" or (kind == PODS and not self._on_node(obj)):
            table.pop(key, None)
        else:
            table[key] = obj
        self._changed.set()

    def _on_node(self, pod: Obj) -> bool:
        return (pod.get("spec") or {}).get("nodeName") == self.node

    # -- readiness and admin ------------------------------------------------

    def not_synced(self) -> str | None:
        missing = [kind for kind in (PODS, NAMESPACES) if kind not in self._listed]
        return f"{' and '.join(missing)} not listed from the API server yet" if missing else None

    def dump(self) -> dict[str, Any]:
        return {
            "synced": self.not_synced() is None,
            "pods": dict(sorted(self.status.items())),
        }

    # -- the Enroller's directory -------------------------------------------

    def _pod(self, namespace: str, name: str) -> Obj | None:
        for pod in self._pods.values():
            meta = _meta(pod)
            if (meta.get("namespace"), meta.get("name")) == (namespace, name):
                return pod
        return None

    def _namespace_of(self, pod: Obj) -> Obj | None:
        return self._namespaces.get(str(_meta(pod).get("namespace")))

    def lookup(self, namespace: str, name: str) -> MeshIntent | str:
        """In the mesh by the rule and by the mesh view, with the annotated capture.

        Raises TransientError for a pod the watch has not shown (fail closed)
        and InvalidInputError for an annotation that does not parse.
        """
        pod = self._pod(namespace, name)
        if pod is None:
            raise TransientError(f"pod {namespace}/{name} is not known to the agent's watch yet")
        out = outside_mesh(pod, self._namespace_of(pod))
        if out is not None:
            return out
        intent = self._mesh.lookup(namespace, name)
        if isinstance(intent, str):
            return intent
        capture = capture_config(pod_annotations(pod), intent.capture)
        return MeshIntent(service_account=intent.service_account, capture=capture)

    # -- the CNI ADD gate -----------------------------------------------------

    async def admit(self, pod: PodInfo) -> str | None:
        """None to go on with the ADD; else why the pod starts uncaptured.

        Raises TransientError (the runtime retries) while the pod or its
        workload is not known yet, InvalidInputError for a bad annotation.
        """
        if not (pod.namespace and pod.name):
            return None  # not a Kubernetes pod: the mesh view alone decides
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._admission_wait_s
        found = self._pod(pod.namespace, pod.name)
        while found is None or (pod.uid and str(_meta(found).get("uid")) != pod.uid):
            if loop.time() >= deadline:
                raise TransientError(
                    f"pod {pod.describe()} (uid {pod.uid}) is not known to the agent's watch yet"
                )
            await asyncio.sleep(_POLL_S)
            found = self._pod(pod.namespace, pod.name)
        out = outside_mesh(found, self._namespace_of(found))
        if out is not None:
            return out
        # A bad annotation refuses the ADD now, before anything waits or is applied.
        capture_config(pod_annotations(found), CaptureConfig())
        while not self._workload_known(pod.namespace, pod.name):
            if loop.time() >= deadline:
                raise TransientError(
                    f"pod {pod.describe()} is in the mesh, but the control plane has not "
                    "pushed its workload yet"
                )
            await asyncio.sleep(_POLL_S)
        return None

    def _workload_known(self, namespace: str, name: str) -> bool:
        return self._mesh.synced and any(
            (w.namespace, w.name) == (namespace, name) for w in self._mesh.workloads()
        )

    # -- the reconcile loop ---------------------------------------------------

    async def run(self) -> None:
        """Reconcile on every change and every resync period, until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self._resync_s)
                await asyncio.sleep(COALESCE_S)
            except TimeoutError:
                pass
            self._changed.clear()
            await self.reconcile()

    async def reconcile(self) -> None:
        """One pass over the node's pods."""
        if self.not_synced() is not None or not self._mesh.synced or self.enroller is None:
            return
        enroller = self.enroller
        decisions = {}
        for uid, pod in self._pods.items():
            namespace = self._namespace_of(pod)
            meta = _meta(pod)
            mesh = self._mesh.lookup(str(meta.get("namespace")), str(meta.get("name")))
            decisions[uid] = decide(pod, namespace, mesh, self._registry.get(uid))
        index: PodProcesses = {}
        named: Mapping[int, str] = {}
        if any(isinstance(d, Enroll) for d in decisions.values()):
            index, named = await asyncio.to_thread(self._scan)
        status: dict[str, str] = {}
        gate = asyncio.Semaphore(CONCURRENCY)

        async def carry_out(uid: str) -> None:
            pod, decision = self._pods.get(uid), decisions[uid]
            if pod is None:
                return  # deleted meanwhile; its CNI DEL unenrolls it
            async with gate:
                status[_key(pod)] = await self._carry_out(enroller, pod, decision, index, named)

        await asyncio.gather(*(carry_out(uid) for uid in list(decisions)))
        self.status = status

    def _scan(self) -> tuple[PodProcesses, Mapping[int, str]]:
        return index_processes(self._proc.processes()), self._proc.named_netns()

    async def _carry_out(
        self,
        enroller: Enroller,
        pod: Obj,
        decision: Enroll | Unenroll | Leave,
        index: PodProcesses,
        named: Mapping[int, str],
    ) -> str:
        key = _key(pod)
        if isinstance(decision, Leave):
            return decision.status
        if isinstance(decision, Unenroll):
            log.info("unenrolling %s: %s", key, decision.status)
            await enroller.delete(decision.container_id)
            return decision.status
        return await self._enroll_running(enroller, pod, index, named)

    async def _enroll_running(
        self,
        enroller: Enroller,
        pod: Obj,
        index: PodProcesses,
        named: Mapping[int, str],
    ) -> str:
        """Enroll a pod whose ADD the agent did not see, as that ADD would have."""
        key = _key(pod)
        sandbox = find_sandbox(pod, index, named)
        if not isinstance(sandbox, Sandbox):
            log.warning("pod %s is in the mesh but not enrolled: %s", key, sandbox)
            return f"not enrolled: sandbox not found: {sandbox}"
        if self._registry.get(str(_meta(pod).get("uid"))) is not None:
            return "enrolling"  # its CNI ADD got there first
        try:
            info = pod_info(pod, sandbox)
        except ValueError as e:
            return f"not enrolled: the pod's status.podIPs: {e}"
        log.info(
            "enrolling %s, running since before its ADD was seen (sandbox %s, netns %s)",
            key,
            sandbox.container_id[:12],
            sandbox.netns,
        )
        try:
            outcome = await enroller.add(info)
        except WeirError as e:
            log.warning("enrolling %s failed: %s", key, e.message)
            return f"not enrolled: {e.message}"
        return "captured" if outcome.captured else f"not in the mesh: {outcome.reason}"


def pod_info(pod: Obj, sandbox: Sandbox) -> PodInfo:
    """The PodInfo the runtime's CNI ADD would have carried for this pod.

    The CNI result's prefix lengths are not in the pod's status; every user
    of PodInfo.ips reads the address only, so host prefixes stand in.
    Raises ValueError for an address that does not parse.
    """
    meta = _meta(pod)
    status = pod.get("status") or {}
    addresses = [entry.get("ip") for entry in status.get("podIPs") or () if entry.get("ip")]
    if not addresses and status.get("podIP"):
        addresses = [status["podIP"]]
    return PodInfo(
        container_id=sandbox.container_id,
        netns=sandbox.netns,
        ifname=POD_INTERFACE,
        ips=tuple(str(ipaddress.ip_interface(a)) for a in addresses),
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
    )
