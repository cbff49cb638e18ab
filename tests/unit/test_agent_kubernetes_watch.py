"""List-then-watch against a scripted API: versions carried, bookmarks, 410 relists, retries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from node_agent.kubernetes.watch import ListWatch, Obj
from weir_common.retry import Backoff


class Response:
    def __init__(self, body: bytes) -> None:
        self.status = 200
        self.data = body

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        yield self.data

    def close(self) -> None:
        return None

    def release_conn(self) -> None:
        return None


def pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": name, "resourceVersion": version}}


class ScriptedApi:
    """Answers lists and watches from scripts; sets `stop` when the watch script runs out."""

    def __init__(self, lists: list[Any], watches: list[list[Any]], stop: threading.Event) -> None:
        self.lists = lists
        self.watches = watches
        self.stop = stop
        self.calls: list[dict[str, Any]] = []

    def list_pods(self, **kwargs: Any) -> Response:
        """Stands in for CoreV1Api.list_*: a list, or with watch=True a stream of events."""
        self.calls.append(kwargs)
        if not kwargs.get("watch"):
            answer = self.lists.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return Response(json.dumps(answer).encode())
        if not self.watches:
            self.stop.set()
            return Response(b"")
        events = self.watches.pop(0)
        return Response(b"".join(json.dumps(e).encode() + b"\n" for e in events))


class Sink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    def replace(self, kind: str, objects: Sequence[Obj]) -> None:
        self.seen.append(("replace", *(str(o["metadata"]["name"]) for o in objects)))

    def event(self, kind: str, event_type: str, obj: Mapping[str, Any]) -> None:
        self.seen.append((event_type, str(obj["metadata"]["name"])))


def test_versions_flow_from_list_to_events_and_bookmarks_and_410_lists_again() -> None:
    stop = threading.Event()
    api = ScriptedApi(
        lists=[
            {"metadata": {"resourceVersion": "10"}, "items": [pod("a", "9")]},
            {"metadata": {"resourceVersion": "30"}, "items": [pod("b", "11")]},
        ],
        watches=[
            [
                {"type": "ADDED", "object": pod("b", "11")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
            ],
            [{"type": "ERROR", "object": {"code": 410, "reason": "Gone", "message": "too old"}}],
        ],
        stop=stop,
    )
    sink = Sink()
    watch = ListWatch(
        "pods", api.list_pods, sink, field_selector="spec.nodeName=n1", backoff=Backoff(0.001)
    )
    worker = threading.Thread(target=watch.run_blocking, args=(stop,))
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert sink.seen == [("replace", "a"), ("ADDED", "b"), ("replace", "b")]
    watches = [c for c in api.calls if c.get("watch")]
    assert [c["resource_version"] for c in watches] == ["10", "15", "30"]
    assert all(c["allow_watch_bookmarks"] and c["timeout_seconds"] for c in watches)
    assert all(c["field_selector"] == "spec.nodeName=n1" for c in api.calls)


def test_a_failed_list_is_retried_after_a_backoff() -> None:
    stop = threading.Event()
    api = ScriptedApi(
        lists=[
            ConnectionRefusedError("API server down"),
            {"metadata": {"resourceVersion": "5"}, "items": []},
        ],
        watches=[],
        stop=stop,
    )
    sink = Sink()
    worker = threading.Thread(
        target=ListWatch("namespaces", api.list_pods, sink, backoff=Backoff(0.001)).run_blocking,
        args=(stop,),
    )
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert sink.seen == [("replace",)]
    assert [bool(c.get("watch")) for c in api.calls] == [False, False, True]
