"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop


@pytest.fixture
def run() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine on a fresh uvloop, failing it after 20 s."""

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        return uvloop.run(asyncio.wait_for(coro, timeout=20))

    return runner
