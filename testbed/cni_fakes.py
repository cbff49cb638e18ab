"""A CniEventHandler for tests: records every event and answers as told."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cni_plugin.protocol import PodInfo
from node_agent.cni_events.handler import AddDecision, Attachment
from weir_common.errors import InvalidInputError, TransientError, WeirError


@dataclass(frozen=True)
class Event:
    """One call the server made; `netns_inode` is the pod's netns as seen at ADD (else 0)."""

    op: str
    pod: PodInfo | None
    netns_inode: int = 0
    valid: frozenset[Attachment] = frozenset()


class RecordingHandler:
    """Captures every pod unless told otherwise; thread-safe.

    `opt_out` holds (namespace, name) pairs answered "not captured", standing in
    for the agent's annotation check. `refuse`, when set, is raised by every ADD.
    CHECK passes only for pods captured and not since `lose_capture`d.
    """

    def __init__(self) -> None:
        self.opt_out: set[tuple[str, str]] = set()
        self.refuse: WeirError | None = None
        self._events: list[Event] = []
        self._captured: dict[str, PodInfo] = {}
        self._changed = threading.Condition()

    def on_add(self, pod: PodInfo) -> AddDecision:
        try:
            inode = Path(pod.netns).stat().st_ino
        except OSError as e:
            raise InvalidInputError(f"netns of {pod.describe()}: {e.strerror}") from None
        self._record(Event("add", pod, netns_inode=inode))
        if self.refuse is not None:
            raise self.refuse
        if (pod.namespace, pod.name) in self.opt_out:
            return AddDecision(captured=False, reason="opted out by annotation")
        with self._changed:
            self._captured[pod.container_id] = pod
        return AddDecision(captured=True)

    def on_del(self, pod: PodInfo) -> None:
        with self._changed:
            self._captured.pop(pod.container_id, None)
        self._record(Event("del", pod))

    def on_check(self, pod: PodInfo) -> None:
        self._record(Event("check", pod))
        with self._changed:
            if pod.container_id not in self._captured:
                raise TransientError(f"{pod.describe()} is not captured")

    def on_gc(self, valid: frozenset[Attachment]) -> None:
        with self._changed:
            for stale in [cid for cid, p in self._captured.items() if (cid, p.ifname) not in valid]:
                del self._captured[stale]
        self._record(Event("gc", None, valid=valid))

    def lose_capture(self, container_id: str) -> None:
        """Make the agent forget a pod, as if its capture had been torn down behind our back."""
        with self._changed:
            self._captured.pop(container_id, None)

    def captured(self) -> set[str]:
        with self._changed:
            return set(self._captured)

    def events(self, op: str | None = None) -> list[Event]:
        with self._changed:
            return [e for e in self._events if op is None or e.op == op]

    def wait_for(self, op: str, container_id: str, timeout_s: float = 10.0) -> Event:
        """The first `op` event for `container_id`, waiting up to `timeout_s` for it."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for event in self._events:
                    if event.op == op and event.pod and event.pod.container_id == container_id:
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {op} for {container_id} within {timeout_s:g} s")
                self._changed.wait(left)

    def _record(self, event: Event) -> None:
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()
