"""Pooled mTLS connections to peers' 15008: many CONNECT streams per connection.

A TLS handshake costs Python's ssl milliseconds of CPU, a stream on an open
connection microseconds, so a new TCP connection through the mesh should
almost never cost a handshake. Connections are pooled per key (source pod,
destination address, expected identity, certificate generation): a rotated
certificate or a changed trust bundle starts a new key, and connections of
the old one finish their streams and close when idle. At most
`max_connections` per key with at most `max_streams` each; concurrent
callers wait for one dial instead of each dialing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final

from node_agent.proxy.hbone import H2Protocol, HboneStream, StreamRefusedError

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS: Final = 100
DEFAULT_MAX_CONNECTIONS: Final = 16
DEFAULT_IDLE_SECONDS: Final = 60.0

Dialer = Callable[[], Awaitable[H2Protocol]]


class PoolExhaustedError(StreamRefusedError):
    """Every connection to the peer carries its maximum of streams."""


class _Entry:
    def __init__(self) -> None:
        self.connections: list[H2Protocol] = []
        self.dialing: asyncio.Future[H2Protocol] | None = None


class ConnectionPool:
    def __init__(
        self,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
    ) -> None:
        self.max_streams = max_streams
        self.max_connections = max_connections
        self.idle_seconds = idle_seconds
        self._entries: dict[Hashable, _Entry] = {}
        self._idle_timers: dict[H2Protocol, asyncio.TimerHandle] = {}
        self.dials = 0  # handshakes made, for tests and the benchmark

    async def open_stream(self, key: Hashable, authority: str, dial: Dialer) -> HboneStream:
        """A CONNECT stream to `authority` on a pooled connection (dialing one if needed).

        The stream's response is not awaited here.
        """
        # Bounded: each pass either returns, dials, or waits for a dial; a
        # dial that fails raises, and we never wait for more than a handful.
        for _ in range(self.max_connections + 2):
            entry = self._entries.setdefault(key, _Entry())
            conn = self._usable(entry)
            if conn is not None:
                return self._start(conn, authority)
            if entry.dialing is not None:
                await asyncio.shield(entry.dialing)
                continue
            if len(entry.connections) >= self.max_connections:
                raise PoolExhaustedError(
                    f"{len(entry.connections)} connections with {self.max_streams} streams each"
                )
            conn = await self._dial(entry, dial)
            return self._start(conn, authority)
        raise PoolExhaustedError("no connection with room for a stream after waiting for dials")

    def open_stream_now(self, key: Hashable, authority: str) -> HboneStream | None:
        """open_stream's stream if a pooled connection has room for it now, else None
        (open_stream then dials or waits for a dial). No coroutine: the usual case."""
        entry = self._entries.get(key)
        conn = self._usable(entry) if entry is not None else None
        return self._start(conn, authority) if conn is not None else None

    def _usable(self, entry: _Entry) -> H2Protocol | None:
        best: H2Protocol | None = None
        for conn in entry.connections:
            room = min(conn.capacity, self.max_streams - len(conn.streams))
            if room > 0 and (best is None or len(conn.streams) > len(best.streams)):
                # Fullest first: leaves the others to go idle and close.
                best = conn
        return best

    def _start(self, conn: H2Protocol, authority: str) -> HboneStream:
        timer = self._idle_timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        return conn.open_stream(authority)

    async def _dial(self, entry: _Entry, dial: Dialer) -> H2Protocol:
        future: asyncio.Future[H2Protocol] = asyncio.get_running_loop().create_future()
        entry.dialing = future
        try:
            conn = await dial()
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # waiters re-raise it; nobody else needs to see it
            raise
        finally:
            entry.dialing = None
        self.dials += 1
        entry.connections.append(conn)
        future.set_result(conn)
        return conn

    def connection_idle(self, conn: H2Protocol) -> None:
        """Called when a pooled connection's last stream ends."""
        loop = asyncio.get_running_loop()
        old = self._idle_timers.pop(conn, None)
        if old is not None:
            old.cancel()
        self._idle_timers[conn] = loop.call_later(self.idle_seconds, self._close_idle, conn)

    def connection_closed(self, conn: H2Protocol) -> None:
        timer = self._idle_timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        for key, entry in list(self._entries.items()):
            if conn in entry.connections:
                entry.connections.remove(conn)
                if not entry.connections and entry.dialing is None:
                    del self._entries[key]

    def retire(self, predicate: Callable[[Hashable], bool]) -> None:
        """Take connections whose key matches out of the pool; they close once idle."""
        for key in [k for k in self._entries if predicate(k)]:
            for conn in self._entries.pop(key).connections:
                conn.shutdown()

    def _close_idle(self, conn: H2Protocol) -> None:
        self._idle_timers.pop(conn, None)
        if not conn.streams:
            conn.close()

    def close_all(self) -> None:
        for entry in self._entries.values():
            for conn in entry.connections:
                conn.close()
        self._entries.clear()
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()

    def dump(self) -> list[dict[str, Any]]:
        return [
            {
                "key": [str(part) for part in key] if isinstance(key, tuple) else str(key),
                "streams_per_connection": [len(c.streams) for c in entry.connections],
            }
            for key, entry in self._entries.items()
        ]
