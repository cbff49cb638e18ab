"""What the node agent must provide to answer the CNI plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cni_plugin.protocol import PodInfo

# (container_id, ifname): how the runtime names one attachment in a GC request.
Attachment = tuple[str, str]


@dataclass(frozen=True)
class AddDecision:
    """The answer to ADD: captured, or deliberately left out of the mesh and why."""

    captured: bool
    reason: str = ""


class CniEventHandler(Protocol):
    """Called by CniEventServer, one thread per request, possibly concurrently.

    Failures are raised as weir_common.errors.WeirError: its `retryable` flag
    becomes the plugin's choice between "try again later" (the runtime retries
    the pod) and a permanent refusal, and its message reaches the pod's events.
    Any other exception is reported to the plugin as a non-retryable internal
    error and logged here with its traceback.
    """

    def on_add(self, pod: PodInfo) -> AddDecision:
        """Capture the pod before any of its processes run, or decide not to."""
        ...

    def on_del(self, pod: PodInfo) -> None:
        """Forget the pod; must succeed for a pod never seen or already gone."""
        ...

    def on_check(self, pod: PodInfo) -> None:
        """Raise if a pod that should be captured is not (any more)."""
        ...

    def on_gc(self, valid: frozenset[Attachment]) -> None:
        """Drop state of every attachment the runtime no longer lists in `valid`."""
        ...
