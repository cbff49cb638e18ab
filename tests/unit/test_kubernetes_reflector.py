"""Reflector and KubernetesSource against a scripted API: paging, events, 410 relist, backoff."""

import asyncio
import json
import threading

from controlplane import metrics as m
from controlplane.kubernetes.api import ApiException
from controlplane.kubernetes.source import (
    NAMESPACES,
    PODS,
    KubernetesSource,
    Reflector,
    slim_pod,
)
from weir_common.retry import Backoff

FAST = Backoff(initial=0.01, maximum=0.02)
STEP = 5.0


def ns(name, rv, mesh=True):
    labels = {"weir.dev/mesh": "enabled"} if mesh else {}
    return {"metadata": {"name": name, "resourceVersion": str(rv), "labels": labels}}


class Listed:
    def __init__(self, body):
        self.data = json.dumps(body).encode()

    def release_conn(self):
        pass


class Streamed:
    """A watch response: scripted lines, then (if `hold`) silence until shut down."""

    def __init__(self, events, hold, gate=None):
        self.lines = [json.dumps(e).encode() + b"\n" for e in events]
        self.hold = hold
        self.gate = gate
        self.cut = threading.Event()

    def __iter__(self):
        if self.gate is not None:
            self.gate.wait(STEP)
        yield from self.lines
        if self.hold:
            self.cut.wait(STEP)
            raise OSError("shut down")

    def shutdown(self):
        self.cut.set()

    def release_conn(self):
        pass


class ScriptedApi:
    """Answers list calls from `pages` and watch calls from `watches`, in order."""

    def __init__(self, pages, watches, list_failures=0, gate=None):
        self.gate = gate
        self.pages = list(pages)
        self.watches = list(watches)
        self.list_failures = list_failures
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if kwargs.get("watch"):
            if not self.watches:
                return Streamed([], hold=True)
            script = self.watches.pop(0)
            if isinstance(script, Exception):
                raise script
            return Streamed(script, hold=False, gate=self.gate)
        if self.list_failures:
            self.list_failures -= 1
            raise ConnectionError("apiserver not there yet")
        return Listed(self.pages.pop(0))


async def until(predicate):
    async with asyncio.timeout(STEP):
        while not predicate():
            await asyncio.sleep(0.01)


def test_pages_events_bookmarks_and_relist_after_410():
    api = ScriptedApi(
        pages=[
            {"items": [ns("a", 5)], "metadata": {"continue": "page-2"}},
            {"items": [ns("x", 6)], "metadata": {"resourceVersion": "10"}},
            {"items": [ns("b", 11), ns("c", 19)], "metadata": {"resourceVersion": "20"}},
        ],
        watches=[
            [
                {"type": "ADDED", "object": ns("b", 11)},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
                {"type": "DELETED", "object": ns("a", 13)},
                {"type": "MODIFIED", "object": ns("x", 14, mesh=False)},
            ],
            [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}],
        ],
    )
    changes = []
    metrics = m.Metrics()

    async def scenario():
        reflector = Reflector(
            NAMESPACES, api, lambda: changes.append(1), metrics, backoff=FAST, page_size=1
        )
        task = asyncio.create_task(reflector.run())
        try:
            await until(lambda: reflector.resource_version == "20")
            await until(lambda: sum(1 for c in api.calls if c.get("watch")) == 3)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return reflector

    reflector = asyncio.run(scenario())
    assert set(reflector.items) == {"b", "c"}
    lists = [c for c in api.calls if not c.get("watch")]
    assert [c.get("_continue") for c in lists] == [None, "page-2", None]
    assert all(c["limit"] == 1 for c in lists)
    watches = [c for c in api.calls if c.get("watch")]
    assert [w["resource_version"] for w in watches] == ["10", "14", "20"]
    assert all(w["allow_watch_bookmarks"] and w["timeout_seconds"] > 0 for w in watches)
    assert all(w["_request_timeout"][1] > 0 for w in watches)
    assert metrics.value(m.K8S_RELISTS, resource="namespaces") == 1
    # Each list and each ADDED/MODIFIED/DELETED is a change; bookmarks are not.
    assert len(changes) == 5


def test_a_watch_refused_with_http_410_lists_again():
    gone = ApiException(status=410, reason="Gone")
    api = ScriptedApi(
        pages=[
            {"items": [ns("a", 5)], "metadata": {"resourceVersion": "10"}},
            {"items": [ns("b", 30)], "metadata": {"resourceVersion": "30"}},
        ],
        watches=[gone],
    )
    metrics = m.Metrics()

    async def scenario():
        reflector = Reflector(NAMESPACES, api, lambda: None, metrics, backoff=FAST)
        task = asyncio.create_task(reflector.run())
        try:
            await until(lambda: reflector.resource_version == "30")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return reflector

    assert set(asyncio.run(scenario()).items) == {"b"}
    assert metrics.value(m.K8S_RELISTS, resource="namespaces") == 1
    assert metrics.value(m.K8S_WATCH_ERRORS, resource="namespaces") == 0


def test_list_failures_back_off_and_retry():
    api = ScriptedApi(pages=[{"items": [], "metadata": {"resourceVersion": "3"}}], watches=[])
    metrics = m.Metrics()

    async def scenario():
        reflector = Reflector(NAMESPACES, api, lambda: None, metrics, backoff=FAST)
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), STEP)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    api.list_failures = 3
    asyncio.run(scenario())
    assert metrics.value(m.K8S_WATCH_ERRORS, resource="namespaces") == 3


def test_source_publishes_nothing_before_every_list_then_coalesces():
    pod = {
        "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": "1"},
        "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}]},
    }
    namespaces = ScriptedApi(
        pages=[{"items": [ns("shop", 1)], "metadata": {"resourceVersion": "1"}}],
        watches=[],
        list_failures=2,
    )
    relabeled = {**pod, "metadata": {**pod["metadata"], "labels": {"app": "web"}}}
    gate = threading.Event()
    pods = ScriptedApi(
        pages=[{"items": [], "metadata": {"resourceVersion": "1"}}],
        watches=[[{"type": "ADDED", "object": pod}, {"type": "MODIFIED", "object": relabeled}]],
        gate=gate,
    )
    published = []

    async def scenario():
        source = KubernetesSource(
            [(NAMESPACES, namespaces), (PODS, pods)],
            "cluster.local",
            m.Metrics(),
            coalesce_s=1.0,
            backoff=FAST,
        )
        try:
            first = await asyncio.wait_for(source.start(), STEP)
            watching = asyncio.create_task(source.watch(published.append))
            gate.set()
            await until(lambda: published)
            await asyncio.sleep(1.2)
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        finally:
            await source.close()
        return first

    first = asyncio.run(scenario())
    assert namespaces.list_failures == 0
    assert dict(first.workloads) == {}
    # Two events in one burst: one rebuild, one publish.
    assert len(published) == 1
    assert list(published[0].workloads) == ["shop/web"]
    assert dict(published[0].workloads["shop/web"].labels) == {"app": "web"}
    assert list(published[0].workloads["shop/web"].ips) == ["10.244.1.5"]


def test_slim_pod_keeps_only_what_translation_reads():
    pod = {
        "metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"a": "b"}, "x": 1},
        "spec": {"nodeName": "n1", "hostNetwork": False, "containers": [{"image": "big"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}], "conditions": []},
    }
    assert slim_pod(pod) == {
        "metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"a": "b"}},
        "spec": {"nodeName": "n1", "hostNetwork": False},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}]},
    }
