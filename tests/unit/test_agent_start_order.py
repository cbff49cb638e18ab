"""The agent's start order and proxy readiness, on the real assembly with stand-ins.

- Converge (undo, forget, repair of recorded pods) finishes before the config
  subscription starts: a new stream re-registers every remembered pod, and
  one racing converge re-registered a pod converge had just deregistered.
- Once a proxy synced, the agent is not ready until capture was re-checked
  for it (eBPF steers to that proxy's own sockets).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node_agent.agent.app import Agent, AgentSettings
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.proxy_handoff.agent_side import ProxyHandoffServer
from testbed.enrollment_fakes import FakeCapture


def agent(tmp_path: Path) -> Agent:
    settings = AgentSettings(
        node="node-1",
        controlplane=ControlPlaneEndpoint.insecure("127.0.0.1:9"),
        token="t",
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        admin_port=0,
        health_port=0,
    )
    return Agent(settings, FakeCapture(), "iptables")


def test_converge_finishes_before_the_config_subscription_starts(tmp_path):
    async def scenario() -> None:
        started = agent(tmp_path)
        steps: list[str] = []
        subscribed = asyncio.Event()

        async def converge() -> None:
            steps.append("converge started")
            await asyncio.sleep(0.2)
            steps.append("converge done")

        async def subscription() -> None:
            steps.append("subscription")
            subscribed.set()
            await asyncio.Event().wait()

        started.enroller.converge = converge  # type: ignore[method-assign]
        started.subscription.run = subscription  # type: ignore[method-assign]
        running = asyncio.get_running_loop().create_task(started.run())
        try:
            async with asyncio.timeout(5):
                await subscribed.wait()
        finally:
            started.stop()
            assert await running == 0
        assert steps == ["converge started", "converge done", "subscription"]

    asyncio.run(scenario())


def test_not_ready_while_capture_is_rechecked_for_a_newly_synced_proxy(tmp_path, monkeypatch):
    monkeypatch.setattr(ProxyHandoffServer, "synced_proxies", property(lambda _self: 1))

    async def scenario() -> None:
        started = agent(tmp_path)
        release = asyncio.Event()
        converging = asyncio.Event()

        async def converge() -> None:
            converging.set()
            await release.wait()

        started.enroller.converge = converge  # type: ignore[method-assign]
        assert started._proxy_ready() is None
        rechecking = asyncio.get_running_loop().create_task(started._converge_for_proxy())
        await converging.wait()
        assert started._proxy_ready() == "re-checking capture for a newly synced node proxy"
        release.set()
        await rechecking
        assert started._proxy_ready() is None

    asyncio.run(scenario())


def test_a_failed_recheck_does_not_hold_readiness_down_for_ever(tmp_path, monkeypatch):
    monkeypatch.setattr(ProxyHandoffServer, "synced_proxies", property(lambda _self: 1))

    async def scenario() -> None:
        started = agent(tmp_path)

        async def converge() -> None:
            raise RuntimeError("bug")

        started.enroller.converge = converge  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await started._converge_for_proxy()
        assert started._proxy_ready() is None

    asyncio.run(scenario())
