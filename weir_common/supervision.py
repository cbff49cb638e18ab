"""Long-lived background tasks that never die unnoticed.

A daemon's background work (the config subscription, accept loops, watches)
is meant to run until the process stops. One that ends for any other reason,
an exception or a plain return, has failed: the process stops being ready at
once (`not_ready` feeds readiness), the task is restarted after a pause, and
after too many failures in a row the supervisor gives up and asks the process
to exit, so that a crash loop is seen by whatever runs the process (kubelet,
the local mesh) instead of hiding behind endless restarts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

log = logging.getLogger(__name__)

# Pauses before each restart; one failure more than there are pauses gives up.
RESTART_DELAYS_S: Final = (1.0, 2.0, 4.0, 8.0, 16.0)
# A task that ran this long before failing was healthy: its failure count restarts.
HEALTHY_AFTER_S: Final = 60.0

Run = Callable[[], Coroutine[Any, Any, None]]


class Supervisor:
    """Runs named tasks, restarts those that end, and reports which are down."""

    def __init__(
        self,
        on_give_up: Callable[[str], None],
        *,
        restart_delays: Sequence[float] = RESTART_DELAYS_S,
        healthy_after_s: float = HEALTHY_AFTER_S,
    ) -> None:
        self._on_give_up = on_give_up
        self._delays = tuple(restart_delays)
        self._healthy_after_s = healthy_after_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # name -> why it is not running right now.
        self._down: dict[str, str] = {}

    def start(self, name: str, run: Run) -> None:
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already supervised")
        self._tasks[name] = asyncio.get_running_loop().create_task(
            self._keep(name, run), name=f"supervised:{name}"
        )

    def not_ready(self) -> str | None:
        """A readiness check: None while every task runs, else what is down."""
        if not self._down:
            return None
        return "; ".join(reason for _, reason in sorted(self._down.items()))

    def dump(self) -> dict[str, str]:
        return {name: self._down.get(name, "running") for name in sorted(self._tasks)}

    async def stop(self, name: str) -> None:
        """Stop one task now (shutdown order matters for some)."""
        task = self._tasks.pop(name)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._down.pop(name, None)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    async def _keep(self, name: str, run: Run) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            try:
                await run()
                problem = "ended"
                log.error("background task %s ended; it should run until shutdown", name)
            except Exception as e:
                problem = f"crashed: {e!r}"
                log.exception("background task %s crashed", name)
            failures = 1 if loop.time() - started >= self._healthy_after_s else failures + 1
            if failures > len(self._delays):
                reason = f"{name} {problem}; gave up after {failures} failures in a row"
                self._down[name] = reason
                self._on_give_up(reason)
                return
            delay = self._delays[failures - 1]
            self._down[name] = f"{name} {problem}; restart {failures} in {delay:g} s"
            await asyncio.sleep(delay)
            del self._down[name]


async def wait_any(*events: asyncio.Event) -> None:
    """Return once any of `events` is set (a stop request, a supervisor giving up)."""
    waiters = [asyncio.get_running_loop().create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
