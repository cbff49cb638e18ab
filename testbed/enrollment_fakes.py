"""Quiet stand-ins for the Enroller's collaborators, for tests that watch something else.

The Enroller takes a capture engine, a proxy handoff and a registrar. Tests of
what sits around it (the Kubernetes follower, the agent's metrics, the node's
probe rules) need those to succeed quietly or fail on cue, and to say what
capture is in place; tests of the Enroller itself journal every call instead
(tests/netns/test_enroller.py).
"""

from __future__ import annotations

from node_agent.enrollment.registry import PodRecord
from node_agent.netns import Netns
from node_agent.proxy_handoff.protocol import EnrolledPod
from node_agent.redirect.config import CaptureConfig
from weir_common.errors import NodeSetupError


class FakeCapture:
    """Keeps the config applied per netns path; `fail_apply`, `fail_remove` raise as iptables."""

    def __init__(self) -> None:
        self.applied: dict[str, CaptureConfig] = {}
        self.fail_apply = False
        self.fail_remove = False

    def apply(self, ns: Netns, config: CaptureConfig) -> object:
        if self.fail_apply:
            raise NodeSetupError("iptables-restore: line 3 failed")
        self.applied[str(ns.path)] = config
        return None

    def check(self, ns: Netns, config: CaptureConfig) -> list[str]:
        return []

    def remove(self, ns: Netns) -> object:
        if self.fail_remove:
            raise NodeSetupError("iptables-restore: chain busy")
        self.applied.pop(str(ns.path), None)
        return None

    def forget(self, netns_cookie: int) -> object:
        return None

    def prune(self) -> list[str]:
        return []


class AcceptingProxy:
    """A proxy handoff that takes every pod."""

    async def add(self, pod: EnrolledPod, netns: Netns) -> None:
        return None

    async def remove(self, uid: str) -> None:
        return None


class AcceptingRegistrar:
    """A control plane that accepts every registration."""

    async def register(self, record: PodRecord) -> None:
        return None

    async def deregister(self, record: PodRecord) -> None:
        return None
