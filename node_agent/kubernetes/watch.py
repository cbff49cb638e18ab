"""List-then-watch of one kind of object, in a thread (the `kubernetes` client blocks).

The protocol every Kubernetes controller follows: list (the full state and
its resourceVersion), then watch from that version with bookmarks (so the
version held stays fresh on a quiet cluster), each watch ending after a
server-side timeout and resumed from the last version seen. A watch that
answers 410 Gone (the version is older than the API server keeps) is
answered with a new list. Any other failure is retried after a backoff.

Objects are handed on as the API server sent them (plain dicts, camelCase),
which is what weir_common.kubernetes reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

from kubernetes.client.exceptions import ApiException

from weir_common.futures import settle
from weir_common.retry import Backoff

log = logging.getLogger(__name__)

GONE: Final = 410
# The API server ends each watch after this long; the client gives up on a
# silent connection somewhat later (bookmarks arrive about once a minute).
WATCH_TIMEOUT_S: Final = 240
CLIENT_TIMEOUT_S: Final = WATCH_TIMEOUT_S + 60
LIST_TIMEOUT_S: Final = 30

Obj = Mapping[str, Any]


class WatchSink(Protocol):
    """Receives what the watch sees; called on the watch's thread."""

    def replace(self, kind: str, objects: Sequence[Obj]) -> None:
        """The full current state (after every list)."""
        ...

    def event(self, kind: str, event_type: str, obj: Obj) -> None:
        """ADDED, MODIFIED or DELETED."""
        ...


class ListWatch:
    def __init__(
        self,
        kind: str,
        list_call: Callable[..., Any],
        sink: WatchSink,
        *,
        field_selector: str | None = None,
        backoff: Backoff | None = None,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
    ) -> None:
        self.kind = kind
        self._list_call = list_call
        self._sink = sink
        self._selector = {"field_selector": field_selector} if field_selector else {}
        self._backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        self._watch_timeout_s = watch_timeout_s
        # The watch response being read: shut down at stop, so the thread ends now.
        self._current: Any = None

    def run_blocking(self, stop: threading.Event) -> None:
        """List and watch until `stop` is set; failures are logged and retried, never raised."""
        version: str | None = None
        failures = 0
        while not stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch_from(version, stop)
                failures = 0
            except ApiException as e:
                if e.status == GONE:
                    log.info(
                        "%s watch: version %s expired (410 Gone); listing again", self.kind, version
                    )
                    version = None
                    continue
                failures += 1
                log.warning("%s list/watch failed: %s %s", self.kind, e.status, e.reason)
            except Exception as e:  # connection errors come in many types: all retried
                failures += 1
                log.warning("%s list/watch failed: %r", self.kind, e)
            stop.wait(self._backoff.delay(failures))

    def _list(self) -> str:
        response = self._list_call(
            **self._selector, _preload_content=False, _request_timeout=LIST_TIMEOUT_S
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        items = [item for item in body.get("items") or () if isinstance(item, Mapping)]
        self._sink.replace(self.kind, items)
        version = str(body["metadata"]["resourceVersion"])
        log.info("%s listed: %d objects at version %s", self.kind, len(items), version)
        return version

    def _watch_from(self, version: str, stop: threading.Event) -> str:
        """Watch until the server ends the watch; the last version seen.

        The response is read here line by line rather than through the
        client's Watch helper, whose raw mode cannot report an ERROR event
        (it fails on the 410 this must answer with a list).
        """
        response = self._list_call(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            _request_timeout=CLIENT_TIMEOUT_S,
            _preload_content=False,
            **self._selector,
        )
        self._current = response
        try:
            for line in _lines(response):
                if stop.is_set():
                    break
                version = self._handle(json.loads(line), version)
        finally:
            self._current = None
            response.close()
            response.release_conn()
        return version

    def _handle(self, event: Obj, version: str) -> str:
        """Hand one watch event on; the version to resume from after it."""
        event_type = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            return version
        if event_type == "ERROR":
            raise ApiException(status=obj.get("code"), reason=str(obj.get("message", "")))
        if event_type in ("ADDED", "MODIFIED", "DELETED"):
            self._sink.event(self.kind, str(event_type), obj)
        seen = (obj.get("metadata") or {}).get("resourceVersion")
        return str(seen) if seen else version

    async def run(self) -> None:
        """run_blocking on its own thread until cancelled (a supervised task)."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        stop = threading.Event()

        def body() -> None:
            try:
                self.run_blocking(stop)
            except BaseException as e:  # handed to the supervised task, which reports it
                loop.call_soon_threadsafe(settle, ended, e)
            else:
                loop.call_soon_threadsafe(settle, ended)

        threading.Thread(target=body, name=f"watch {self.kind}", daemon=True).start()
        try:
            await ended
        finally:
            stop.set()
            _interrupt(self._current)


def _lines(response: Any) -> Iterator[str]:  # noqa: ANN401 - a urllib3 response
    """The non-empty lines of a streamed response (one JSON event each)."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk if isinstance(chunk, bytes) else str(chunk).encode()
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip():
                yield line.decode("utf-8", errors="replace")
    if buffer.strip():
        yield buffer.decode("utf-8", errors="replace")


def _interrupt(response: Any) -> None:  # noqa: ANN401 - a urllib3 response
    """Shut the response's socket down from another thread, so a blocked read returns now.

    Closing it instead could wait on the TLS lock the blocked read holds.
    """
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
