"""Background tasks that die take readiness down, are restarted, and end the process if they
keep dying; checked through the real admin endpoint and the real agent assembly."""

from __future__ import annotations

import asyncio
import json
import time

from node_agent.admin.server import AdminRegistry, HttpEndpoint
from node_agent.agent.app import Agent, AgentSettings
from node_agent.controlplane_access import ControlPlaneEndpoint
from weir_common.supervision import Supervisor, wait_any


async def get_ready(port: int) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def wait_status(port: int, status: int, within_s: float) -> dict[str, object]:
    deadline = time.monotonic() + within_s
    while True:
        got, body = await get_ready(port)
        if got == status:
            return body
        assert time.monotonic() < deadline, f"readiness stayed {got}: {body}"
        await asyncio.sleep(0.05)


def test_a_crashed_task_is_reported_not_ready_then_restarted():
    async def scenario() -> None:
        crash = asyncio.Event()
        runs = 0

        async def watch() -> None:
            nonlocal runs
            runs += 1
            await crash.wait()
            crash.clear()
            raise RuntimeError("unexpected config")

        supervisor = Supervisor(lambda _: None, restart_delays=(1.0,))
        admin = AdminRegistry()
        admin.add_readiness("tasks", supervisor.not_ready)
        endpoint = HttpEndpoint(admin, "127.0.0.1", 0, admin=True)
        await endpoint.start()
        try:
            supervisor.start("config watch", watch)
            await wait_status(endpoint.port, 200, 5)
            crash.set()
            body = await wait_status(endpoint.port, 503, 5)
            reasons = body["reasons"]
            assert isinstance(reasons, dict)
            assert "config watch crashed: RuntimeError('unexpected config')" in reasons["tasks"]
            await wait_status(endpoint.port, 200, 5)
            assert runs == 2
        finally:
            await supervisor.close()
            await endpoint.close()

    asyncio.run(scenario())


def test_a_task_that_keeps_dying_makes_the_supervisor_give_up():
    async def scenario() -> None:
        gave_up: list[str] = []

        async def returns_at_once() -> None:
            return

        supervisor = Supervisor(gave_up.append, restart_delays=(0.01, 0.01))
        supervisor.start("accept loop", returns_at_once)
        async with asyncio.timeout(5):
            while not gave_up:
                await asyncio.sleep(0.01)
        assert gave_up == ["accept loop ended; gave up after 3 failures in a row"]
        assert supervisor.not_ready() == gave_up[0]
        await supervisor.close()

    asyncio.run(scenario())


def test_a_task_that_ran_long_enough_gets_a_fresh_count():
    async def scenario() -> None:
        gave_up: list[str] = []
        runs = 0

        async def slow_then_dies() -> None:
            nonlocal runs
            runs += 1
            await asyncio.sleep(0.05)
            raise OSError("lost")

        supervisor = Supervisor(gave_up.append, restart_delays=(0.01,), healthy_after_s=0.04)
        supervisor.start("stream", slow_then_dies)
        await asyncio.sleep(0.5)
        await supervisor.close()
        assert runs > 3
        assert gave_up == []

    asyncio.run(scenario())


class NoCapture:
    def apply(self, ns: object, config: object) -> None:
        return None

    def check(self, ns: object, config: object) -> list[str]:
        return []

    def remove(self, ns: object) -> None:
        return None

    def forget(self, netns_cookie: int) -> None:
        return None

    def prune(self) -> list[str]:
        return []


def test_the_agent_goes_unready_when_its_config_subscription_dies(tmp_path):
    """The real assembly: a crash in the xDS subscription is a failing readiness check."""

    async def scenario() -> None:
        settings = AgentSettings(
            node="node-1",
            controlplane=ControlPlaneEndpoint.insecure("127.0.0.1:9"),
            token="t",
            state_dir=tmp_path / "state",
            run_dir=tmp_path / "run",
            admin_port=0,
            health_port=0,
        )
        agent = Agent(settings, NoCapture(), "iptables")
        crashed = asyncio.Event()

        async def crashing_subscription() -> None:
            crashed.set()
            raise KeyError("bug")

        agent.subscription.run = crashing_subscription  # type: ignore[method-assign]
        running = asyncio.get_running_loop().create_task(agent.run())
        try:
            async with asyncio.timeout(5):
                await crashed.wait()
                while "tasks" not in agent.admin.not_ready():
                    await asyncio.sleep(0.05)
            reason = agent.admin.not_ready()["tasks"]
            assert reason.startswith("config subscription crashed: KeyError('bug')")
        finally:
            agent.stop()
            assert await running == 0

    asyncio.run(scenario())


def test_wait_any_returns_on_the_first_event():
    async def scenario() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, b.set)
        async with asyncio.timeout(5):
            await wait_any(a, b)
        assert b.is_set()
        assert not a.is_set()

    asyncio.run(scenario())
