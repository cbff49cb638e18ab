"""The process's recent log records, kept in memory for `/logs` on the admin listener.

`weir node logs` answers from here, so an operator on the node sees what the
agent and the proxy said lately without knowing where their stderr went
(a terminal, journald, the container runtime). Bounded: the oldest record
goes when the ring is full. Records hold what the log already says, and
nothing in Weir logs tokens or keys, so neither does the ring.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections import deque
from typing import Any, Final

CAPACITY: Final = 1000


class LogRing(logging.Handler):
    """The last `capacity` records that passed their logger's level, oldest first."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        super().__init__(logging.NOTSET)
        self._records: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._lock_ring = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message += f" ({type(error).__name__}: {error})"
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        worker = getattr(record, "worker", None)
        if worker is not None:
            entry["worker"] = worker  # which process of a proxy run with --workers
        with self._lock_ring:
            self._records.append(entry)

    def recent(self, lines: int) -> list[dict[str, Any]]:
        """The newest `lines` records, oldest first."""
        with self._lock_ring:
            records = list(self._records)
        return records[-lines:] if lines > 0 else []


_ring: LogRing | None = None
_ring_lock = threading.Lock()


def process_ring() -> LogRing:
    """The ring on this process's root logger, attached on first use."""
    global _ring  # noqa: PLW0603 - one ring per process, as there is one root logger
    with _ring_lock:
        if _ring is None:
            _ring = LogRing()
            logging.getLogger().addHandler(_ring)
        return _ring
