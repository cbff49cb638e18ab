"""Completing a future from a callback that may come late (a timer, a reader, a thread's hop)."""

import asyncio


def settle(future: asyncio.Future[None], error: BaseException | None = None) -> None:
    """Resolve `future` (with `error` if given) unless something already did."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
