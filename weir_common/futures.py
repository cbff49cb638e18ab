"""Futures completed from callbacks that may come late (a timer, a reader, a thread's hop)."""

import asyncio
from collections.abc import Callable
from typing import Any


def settle(future: asyncio.Future[None], error: BaseException | None = None) -> None:
    """Resolve `future` (with `error` if given) unless something already did."""
    if error is not None:
        fail(future, error)
    elif not future.done():
        future.set_result(None)


def fail(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail `future` with `error` unless something already settled it."""
    if not future.done():
        future.set_exception(error)


async def fd_ready(add: Callable[..., object], remove: Callable[[int], object], fd: int) -> None:
    """Wait until the loop reports `fd` ready: `add`/`remove` are the loop's
    add_reader/remove_reader or add_writer/remove_writer."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    add(fd, settle, future)
    try:
        await future
    finally:
        remove(fd)
