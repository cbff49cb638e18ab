"""Logs as one JSON object per line, for log collectors; or the plain text people read.

`weir --log-format json ...` turns it on (the default, text, is for humans).
Every line carries the same fields, in this order:

    time       RFC 3339, UTC, milliseconds: "2026-11-30T00:40:33.123Z"
    level      debug | info | warning | error | critical
    component  the Weir process: agent | proxy | controlplane | cni
               (the `weir` subcommand that runs; `node`, `redirect`, `demo`
               name themselves)
    logger     the Python logger, e.g. "node_agent.enrollment.enroller"
    message    the formatted message

then, only when there is one, `exception` (the traceback text) and `stack`
(when logged with stack_info), then the fields the call passed as `extra=`,
under their own names. An extra that would shadow one of the fields above
is written as `extra_<name>`, so a collector's parsing never depends on
what a call site chose. Nothing in Weir logs tokens or keys; as a second
line of defence an extra whose name looks like a credential (token, secret,
password, private key, authorization...) is written as "[redacted]".
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import threading
import types
from typing import Any, Final, TextIO

FIELDS: Final = ("time", "level", "component", "logger", "message")
OPTIONAL_FIELDS: Final = ("exception", "stack")
FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED: Final = "[redacted]"

_SECRET_NAME: Final = re.compile(
    r"token|secret|passw|private|credential|authoriz|cookie|bearer|api_?key", re.IGNORECASE
)
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_TAKEN: Final = frozenset(FIELDS + OPTIONAL_FIELDS)


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # Cached on the record, as logging.Formatter does, for other handlers.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for name, value in record.__dict__.items():
            if name in _RECORD_ATTRIBUTES or name.startswith("_"):
                continue
            key = f"extra_{name}" if name in _TAKEN else name
            entry[key] = REDACTED if _SECRET_NAME.search(name) else value
        # ASCII escapes keep a message's own line breaks (even U+2028) inside one line.
        return json.dumps(entry, default=str, ensure_ascii=True)


def _rfc3339(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure(level: str, log_format: str, component: str, stream: TextIO | None = None) -> None:
    """Send the root logger's records to `stream` (stderr) at `level`, as `log_format` says.

    In JSON, uncaught exceptions (main thread and others) are logged as
    records too, so that a crash does not drop a bare traceback into a
    stream that a collector parses line by line.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(component))
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _log_uncaught(
    kind: type[BaseException], error: BaseException, trace: types.TracebackType | None
) -> None:
    logging.getLogger("weir").critical("uncaught exception", exc_info=(kind, error, trace))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    # As threading's own hook: a thread that exits with SystemExit is not an error.
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger("weir").critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
