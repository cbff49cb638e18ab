"""How long to wait before trying again: exponential backoff with jitter.

Every reconnect and retry loop (xDS stream, proxy handoff, certificate
renewal) waits `Backoff.delay(failures)`, where `failures` counts the
consecutive failures since the last success. The jitter spreads a fleet of
nodes that lost the same server at the same moment, so they do not all
come back at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (0: right after a success).

        Drawn from the upper half of the exponential ceiling rather than from
        zero up: a retry never comes sooner than half the step, so a server
        that fails every call is not hammered by the unlucky draws.
        """
        ceiling = min(self.maximum, self.initial * self.multiplier ** min(failures, 32))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not crypto)
