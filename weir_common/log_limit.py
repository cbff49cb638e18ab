"""Rate limits for log lines that a peer can cause at will.

A refused handshake, a denied connection or a refused CSR is logged because
an operator needs to see it; a peer that repeats it thousands of times a
second must not be able to fill the disk or drown every other line. The first
occurrence of each kind is logged at once; after that at most one line per
interval, saying how many were left out meanwhile. Metrics still count every
one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any, Final

DEFAULT_INTERVAL_S: Final = 10.0
# Distinct kinds remembered; beyond this the oldest are forgotten (a peer
# inventing new kinds gets at most one line per kind it invents, then none).
_MAX_KINDS: Final = 1024


class LogLimiter:
    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        # kind -> (when a line was last let through, lines left out since)
        self._kinds: dict[Hashable, tuple[float, int]] = {}

    def log(
        self,
        logger: logging.Logger,
        level: int,
        kind: Hashable,
        message: str,
        *args: Any,  # noqa: ANN401 - passed to logging as is
    ) -> None:
        now = self._clock()
        last = self._kinds.get(kind)
        if last is not None and now - last[0] < self._interval_s:
            self._kinds[kind] = (last[0], last[1] + 1)
            return
        if last is None and len(self._kinds) >= _MAX_KINDS:
            del self._kinds[next(iter(self._kinds))]
        self._kinds[kind] = (now, 0)
        if last is not None and last[1]:
            message += f" ({last[1]} more like it in the last {now - last[0]:.0f} s not logged)"
        logger.log(level, message, *args)
