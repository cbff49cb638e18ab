"""The CNI event server's handler, run on its threads, answered by the agent's loop.

The server serves each plugin request on its own thread; enrollment lives on
the agent's asyncio loop (the proxy handoff and the control plane client are
asyncio). Each request is submitted to the loop and waited for with a bound,
so a stuck step turns into a retryable CNI error, not a hung runtime.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from cni_plugin.protocol import PodInfo
from node_agent.cni_events.handler import AddDecision, Attachment
from node_agent.enrollment.enroller import Enroller
from node_agent.mesh_view import MeshView
from weir_common.errors import TransientError

T = TypeVar("T")

log = logging.getLogger(__name__)


class AdmissionGate(Protocol):
    async def admit(self, pod: PodInfo) -> str | None:
        """None to go on with the ADD, else why the pod starts uncaptured; may raise WeirError."""
        ...


class EnrollmentCniHandler:
    def __init__(
        self,
        enroller: Enroller,
        loop: asyncio.AbstractEventLoop,
        mesh: MeshView,
        timeout_s: float = 20.0,
        *,
        gate: AdmissionGate | None = None,
    ) -> None:
        self._enroller = enroller
        self._mesh = mesh
        # On Kubernetes: holds a meshed pod's ADD until the control plane knows it.
        self._gate = gate
        self._loop = loop
        self._timeout_s = timeout_s

    def _run(self, what: str, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TransientError(f"{what} did not finish within {self._timeout_s:.0f}s") from None

    def _identified(self, pod: PodInfo) -> PodInfo:
        if pod.namespace or pod.name:
            return pod
        found = self._mesh.container_workload(pod.container_id)
        if found is None:
            return pod
        # No pod uid without Kubernetes: the container id is unique per sandbox.
        return pod._replace(namespace=found[0], name=found[1], uid=pod.uid or pod.container_id)

    def on_add(self, pod: PodInfo) -> AddDecision:
        pod = self._identified(pod)
        if self._gate is not None:
            outside = self._run(f"admitting {pod.describe()}", self._gate.admit(pod))
            if outside is not None:
                log.info("pod %s starts outside the mesh: %s", pod.describe(), outside)
                return AddDecision(captured=False, reason=outside)
        outcome = self._run(f"enrolling {pod.describe()}", self._enroller.add(pod))
        return AddDecision(captured=outcome.captured, reason=outcome.reason)

    def on_del(self, pod: PodInfo) -> None:
        self._run(f"removing {pod.describe()}", self._enroller.delete(pod.container_id))

    def on_check(self, pod: PodInfo) -> None:
        drift = self._run(f"checking {pod.describe()}", self._enroller.check(pod.container_id))
        if drift:
            raise TransientError(f"capture of {pod.describe()} is not in place: {drift[0]}")

    def on_gc(self, valid: frozenset[Attachment]) -> None:
        keep = frozenset(container_id for container_id, _ in valid)
        self._run("garbage collection", self._enroller.gc(keep))
