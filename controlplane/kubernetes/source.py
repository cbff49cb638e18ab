"""The Kubernetes config source: list then watch the cluster, publish MeshConfigs.

One Reflector per resource (Pods, Namespaces, Services, EndpointSlices,
AuthorizationPolicies, PeerAuthentications) keeps a cache of plain dicts:
it lists (in pages), then watches from the list's resourceVersion with
bookmarks, so a reconnect resumes where it left off. A 410 Gone (the
resourceVersion fell out of the API server's window) makes it list again;
any other failure waits with Backoff and retries; it never gives up. A watch
asks the server to end it after ~5 min and gives up itself on a connection
silent for READ_TIMEOUT_S (bookmarks arrive about every minute), so a dead
connection is replaced.

The `kubernetes` client blocks: lists run in the default executor, each
watch stream in its own daemon thread that hands events to the event loop;
stopping shuts the stream's socket, so no thread outlives its watch for long.

KubernetesSource publishes nothing until every resource has been listed
once (a MeshConfig from a partial view would withdraw the missing part from
every node); then, on changes, it rebuilds at most every `coalesce` seconds
with the pure controlplane.kubernetes.translate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import urllib3
from kubernetes import client

from controlplane import metrics as m
from controlplane.kubernetes.api import call_json, describe, status_of
from controlplane.kubernetes.translate import ClusterObjects, Object, Skipped, translate
from controlplane.mesh import MeshConfig
from weir_common.errors import NodeSetupError
from weir_common.log_limit import LogLimiter
from weir_common.retry import Backoff

log = logging.getLogger(__name__)

CRD_GROUP: Final = "security.weir.dev"
CRD_VERSION: Final = "v1alpha1"
PAGE_SIZE: Final = 500
# The server ends a watch after this many seconds (drawn at random so the
# replicas' watches do not all reconnect together).
WATCH_TIMEOUT_S: Final = (240, 360)
# No byte for this long (not even a bookmark): the connection is dead.
READ_TIMEOUT_S: Final = 120.0
CONNECT_TIMEOUT_S: Final = 10.0
# A watch that ends this quickly with nothing in it counts as a failure (backoff).
MIN_QUIET_WATCH_S: Final = 1.0
COALESCE_S: Final = 0.1
WATCH_BACKOFF: Final = Backoff(initial=0.5, maximum=30.0)
# While the first lists are pending, say which ones every this many seconds.
SYNC_REPORT_S: Final = 10.0

ListFunction = Callable[..., Any]


class ResourceGoneError(Exception):
    """410: the resourceVersion is too old (or a list's continue token expired)."""


class WatchFailedError(Exception):
    """The watch stream ended with an error event other than 410."""


@dataclass(frozen=True)
class Resource:
    name: str  # plural, for logs and metric labels
    field: str  # the ClusterObjects attribute it fills
    namespaced: bool
    slim: Callable[[Object], Object]

    def key(self, obj: Object) -> str:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        return f"{meta.get('namespace', '')}/{name}" if self.namespaced else name


def _without_managed_fields(obj: Object) -> Object:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta}


_POD_META: Final = ("name", "namespace", "uid", "labels", "resourceVersion", "creationTimestamp")
_POD_SPEC: Final = ("nodeName", "hostNetwork", "serviceAccountName")
_POD_STATUS: Final = ("phase", "podIP", "podIPs")


def slim_pod(pod: Object) -> Object:
    """What translation and membership read of a pod; the rest is not kept in memory."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    return {
        "metadata": {k: meta[k] for k in _POD_META if k in meta},
        "spec": {
            k: spec[k] for k in ("nodeName", "hostNetwork", "serviceAccountName") if k in spec
        },
        "status": {k: status[k] for k in ("phase", "podIP", "podIPs") if k in status},
    }


PODS: Final = Resource("pods", "pods", True, slim_pod)
NAMESPACES: Final = Resource("namespaces", "namespaces", False, _without_managed_fields)
SERVICES: Final = Resource("services", "services", True, _without_managed_fields)
ENDPOINT_SLICES: Final = Resource(
    "endpointslices", "endpoint_slices", True, _without_managed_fields
)
AUTHORIZATION_POLICIES: Final = Resource(
    "authorizationpolicies", "authorization_policies", True, _without_managed_fields
)
PEER_AUTHENTICATIONS: Final = Resource(
    "peerauthentications", "peer_authentications", True, _without_managed_fields
)


def cluster_resources(api_client: Any) -> list[tuple[Resource, ListFunction]]:  # noqa: ANN401
    """Every resource the source watches, with the client call that lists it cluster-wide."""
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)

    def crd(plural: str) -> ListFunction:
        return lambda **kwargs: custom.list_cluster_custom_object(
            CRD_GROUP, CRD_VERSION, plural, **kwargs
        )

    return [
        (NAMESPACES, core.list_namespace),
        (PODS, core.list_pod_for_all_namespaces),
        (SERVICES, core.list_service_for_all_namespaces),
        (
            ENDPOINT_SLICES,
            client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces,
        ),
        (AUTHORIZATION_POLICIES, crd(AUTHORIZATION_POLICIES.name)),
        (PEER_AUTHENTICATIONS, crd(PEER_AUTHENTICATIONS.name)),
    ]


class _Stream:
    """The watch response a thread is reading, so the event loop can cut it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._response: Any = None
        self.stopped = False

    def attach(self, response: Any) -> bool:  # noqa: ANN401
        with self._lock:
            self._response = response
            return not self.stopped

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            response = self._response
        if response is not None:
            # Unblocks the thread's read at once (urllib3 >= 2.3).
            with contextlib.suppress(Exception):
                response.shutdown()


class Reflector:
    """List then watch one resource, keeping `items` current; never gives up."""

    def __init__(
        self,
        resource: Resource,
        list_function: ListFunction,
        on_change: Callable[[], None],
        metrics: m.Metrics,
        *,
        backoff: Backoff = WATCH_BACKOFF,
        watch_timeout_s: tuple[int, int] = WATCH_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.resource = resource
        self._list_function = list_function
        self._on_change = on_change
        self._metrics = metrics
        self._backoff = backoff
        self._watch_timeout_s = watch_timeout_s
        self._read_timeout_s = read_timeout_s
        self._page_size = page_size
        self.items: dict[str, Object] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self._errors = LogLimiter()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                if not self.resource_version:
                    await self._list()
                started = time.monotonic()
                events = await self._watch()
                _check_not_hollow(events, time.monotonic() - started)
                failures = 0
            except ResourceGoneError:
                self._metrics.inc(m.K8S_RELISTS, resource=self.resource.name)
                log.info(
                    "%s: resourceVersion too old (410 Gone), listing again", self.resource.name
                )
                self.resource_version = ""
            except Exception as exc:  # the cache must keep trying, whatever failed
                failures += 1
                self._metrics.inc(m.K8S_WATCH_ERRORS, resource=self.resource.name)
                delay = self._backoff.delay(failures)
                self._errors.log(
                    log,
                    logging.WARNING,
                    type(exc).__name__,
                    "%s: %s; retrying in %.1f s",
                    self.resource.name,
                    describe(exc),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        items: dict[str, Object] = {}
        token = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self._page_size}
            if token:
                kwargs["_continue"] = token
            try:
                body = await asyncio.to_thread(call_json, self._list_function, **kwargs)
            except Exception as exc:
                if status_of(exc) == 410:  # the continue token expired
                    raise ResourceGoneError from exc
                raise
            for obj in body.get("items") or ():
                items[self.resource.key(obj)] = self.resource.slim(obj)
            meta = body.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                break
        version = str(meta.get("resourceVersion") or "")
        if not version:
            raise WatchFailedError("the list has no resourceVersion")
        self.items = items
        self.resource_version = version
        self.synced.set()
        self._on_change()

    async def _watch(self) -> int:
        """Follow the watch until it ends; how many events it carried."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Object | None] = loop.create_future()
        stream = _Stream()
        counted = [0]

        def deliver(event: Object) -> None:
            if not stream.stopped:
                counted[0] += 1
                self._apply(event)

        def settle(result: Object | None, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def work() -> None:
            result: Object | None = None
            error: BaseException | None = None
            try:
                result = self._read_stream(stream, lambda e: _post(loop, deliver, e))
            except BaseException as exc:  # handed to the event loop
                error = exc
            _post(loop, settle, result, error)

        threading.Thread(target=work, name=f"watch {self.resource.name}", daemon=True).start()
        try:
            status = await done
        except Exception as exc:
            if status_of(exc) == 410:  # refused before the stream started
                raise ResourceGoneError from exc
            raise
        finally:
            stream.stop()
        if status is not None:
            if status.get("code") == 410:
                raise ResourceGoneError
            raise WatchFailedError(f"error event: {status.get('message') or status}")
        return counted[0]

    def _read_stream(self, stream: _Stream, deliver: Callable[[Object], None]) -> Object | None:
        """In a thread: pass each event on; the Status of an ERROR event, or None at the end."""
        response = self._list_function(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=random.randint(*self._watch_timeout_s),  # noqa: S311 (spread)
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT_S, self._read_timeout_s),
        )
        try:
            if not stream.attach(response):
                return None
            for line in response:
                if stream.stopped:
                    return None
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    return dict(event.get("object") or {})
                deliver(event)
        except urllib3.exceptions.ReadTimeoutError:
            log.debug(
                "%s: watch silent for %.0f s, reconnecting",
                self.resource.name,
                self._read_timeout_s,
            )
        except (urllib3.exceptions.ProtocolError, OSError):
            if not stream.stopped:
                raise
        finally:
            response.release_conn()
        return None

    def _apply(self, event: Object) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if version:
            self.resource_version = version
        if kind in ("ADDED", "MODIFIED"):
            self.items[self.resource.key(obj)] = self.resource.slim(obj)
        elif kind == "DELETED":
            self.items.pop(self.resource.key(obj), None)
        else:
            return  # BOOKMARK: only the resourceVersion moves
        self._on_change()


def _check_not_hollow(events: int, seconds: float) -> None:
    """A watch that ends at once with nothing in it is a failure, so it backs off."""
    if not events and seconds < MIN_QUIET_WATCH_S:
        raise WatchFailedError("the watch ended at once without an event")


def _post(loop: asyncio.AbstractEventLoop, function: Callable[..., None], *args: Any) -> None:  # noqa: ANN401
    # The loop may be gone when a stopped watch's thread finishes.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(function, *args)


class KubernetesSource:
    """ConfigSource over Reflectors: `start` for the first whole view, then `watch`."""

    def __init__(
        self,
        resources: Sequence[tuple[Resource, ListFunction]],
        trust_domain: str,
        metrics: m.Metrics,
        *,
        coalesce_s: float = COALESCE_S,
        **reflector_options: Any,  # noqa: ANN401 (Reflector's keyword arguments)
    ) -> None:
        self._trust_domain = trust_domain
        self._metrics = metrics
        self._coalesce_s = coalesce_s
        self._changed = asyncio.Event()
        self.reflectors = [
            Reflector(resource, function, self._changed.set, metrics, **reflector_options)
            for resource, function in resources
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._mesh: MeshConfig | None = None
        self._skipped: frozenset[Skipped] = frozenset()

    async def start(self) -> MeshConfig:
        """Start listing and watching; return once every resource has been listed."""
        self._tasks = [
            asyncio.create_task(r.run(), name=f"reflector {r.resource.name}")
            for r in self.reflectors
        ]
        while True:
            pending = [r.resource.name for r in self.reflectors if not r.synced.is_set()]
            if not pending:
                break
            waits = [asyncio.create_task(r.synced.wait()) for r in self.reflectors]
            try:
                await asyncio.wait(waits, timeout=SYNC_REPORT_S, return_when=asyncio.ALL_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            still = [r.resource.name for r in self.reflectors if not r.synced.is_set()]
            if still:
                log.warning("waiting for the first list of: %s", ", ".join(still))
        mesh = self._translate()
        self._mesh = mesh
        log.info(
            "Kubernetes source synced: %d workloads, %d services, %d policies",
            len(mesh.workloads),
            len(mesh.services),
            len(mesh.policies),
        )
        return mesh

    def load(self) -> MeshConfig:
        if self._mesh is None:
            raise NodeSetupError("the Kubernetes source has not synced yet (call start first)")
        return self._mesh

    async def watch(self, publish: Callable[[MeshConfig], None]) -> None:
        if self._mesh is None:
            raise NodeSetupError("the Kubernetes source has not synced yet (call start first)")
        while True:
            await self._changed.wait()
            await asyncio.sleep(self._coalesce_s)
            self._changed.clear()
            mesh = self._translate()
            if mesh != self._mesh:
                self._mesh = mesh
                publish(mesh)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def objects(self) -> ClusterObjects:
        return ClusterObjects(**{r.resource.field: r.items for r in self.reflectors})

    def _translate(self) -> MeshConfig:
        result = translate(self.objects(), self._trust_domain)
        skipped = frozenset(result.skipped)
        for item in sorted(skipped - self._skipped, key=lambda s: (s.kind, s.name)):
            log.warning("ignoring invalid %s %s: %s", item.kind, item.name, item.reason)
        counts: Mapping[str, int] = {
            kind: sum(1 for s in skipped if s.kind == kind) for kind in _CHECKED_KINDS
        }
        for kind, count in counts.items():
            self._metrics.set(m.K8S_INVALID_OBJECTS, count, kind=kind)
        self._skipped = skipped
        return result.mesh


_CHECKED_KINDS: Final = ("AuthorizationPolicy", "PeerAuthentication")
