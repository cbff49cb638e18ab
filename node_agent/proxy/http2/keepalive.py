"""Finding a peer that went silent: PING after a quiet spell, give up without an answer.

A peer whose machine died or whose network was cut sends no FIN and no RST:
its TCP connection looks open until our own data runs out of retransmissions
(about 15 minutes), and with nothing to send, never. Streams on it hang, and
a pooled connection keeps taking new ones. So each HTTP/2 connection that
has heard nothing from its peer for `interval` seconds sends a PING; any
bytes back (the ACK, or anything else) count as an answer, and none within
`timeout` seconds ends the connection.

Only silence costs a PING: a connection carrying traffic hears its peer
(data, window updates) and sends none. The owner marks what it heard by
setting `heard` on each read, an attribute store on the hot path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KeepaliveSettings:
    interval: float  # seconds without a byte from the peer before a PING
    timeout: float  # seconds a PING may go unanswered before the connection is dead

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.timeout > 0):
            raise ValueError(
                f"keepalive interval and timeout must be positive (got {self.interval}, "
                f"{self.timeout})"
            )


class Keepalive:
    """One connection's PING timer; `start` once connected, `stop` when it is gone."""

    __slots__ = ("_dead", "_loop", "_ping", "_settings", "_timer", "heard")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: KeepaliveSettings,
        *,
        ping: Callable[[], None],
        dead: Callable[[str], None],
    ) -> None:
        self._loop = loop
        self._settings = settings
        self._ping = ping
        self._dead = dead
        self._timer: asyncio.TimerHandle | None = None
        self.heard = False

    def start(self) -> None:
        self.heard = False
        self._timer = self._loop.call_later(self._settings.interval, self._quiet_spell_over)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _quiet_spell_over(self) -> None:
        if self.heard:
            self.start()
            return
        self._ping()
        self._timer = self._loop.call_later(self._settings.timeout, self._answer_due)

    def _answer_due(self) -> None:
        if self.heard:
            self.start()
            return
        self._timer = None
        self._dead(
            f"the peer answered no PING within {self._settings.timeout:g} s "
            f"(silent for {self._settings.interval + self._settings.timeout:g} s)"
        )
