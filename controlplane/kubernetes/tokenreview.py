"""Node identity in Kubernetes mode: a projected ServiceAccount token, checked by TokenReview.

A token is accepted when the API server authenticates it for our audience,
it belongs to one of the node ServiceAccounts (`--node-service-account`),
and it is bound to a pod that still exists with the same UID, uses that
ServiceAccount and has not finished. The caller's node is that pod's
spec.nodeName as the API server has it now (not the token's node-name claim,
which only says where the pod was when the token was issued).

Verdicts are cached by the token's SHA-256 (never the token), for at most
CACHE_TTL_S (refusals for less), in a bounded LRU, so each RPC does not cost
two API round trips; concurrent calls with the same token share one review.
The decision itself (`check_review`, `check_pod`) is pure.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc
from kubernetes import client

from controlplane import metrics as m
from controlplane.auth import RequestRefusedError, bearer_token
from controlplane.kubernetes.api import call_json, status_of
from weir_common.kubernetes import FINISHED_PHASES
from weir_common.log_limit import LogLimiter

log = logging.getLogger(__name__)

POD_NAME_EXTRA: Final = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA: Final = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_USER_PREFIX: Final = "system:serviceaccount:"
CACHE_TTL_S: Final = 30.0
REFUSAL_TTL_S: Final = 5.0
CACHE_SIZE: Final = 4096
# Reviews in flight at once: each holds a thread and an API connection.
MAX_CONCURRENT_REVIEWS: Final = 8


def refused(reason: str, message: str) -> RequestRefusedError:
    return RequestRefusedError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


@dataclass(frozen=True)
class BoundPod:
    service_account: tuple[str, str]  # (namespace, name)
    pod_name: str
    pod_uid: str


def check_review(
    status: Mapping[str, Any], audience: str, service_accounts: Iterable[tuple[str, str]]
) -> BoundPod:
    """The pod a reviewed token is bound to, or RequestRefusedError (UNAUTHENTICATED)."""
    if status.get("authenticated") is not True:
        error = str(status.get("error") or "not authenticated")
        raise refused("token_invalid", f"the API server rejected the token: {error}")
    if audience not in (status.get("audiences") or ()):
        raise refused("wrong_audience", f"the token is not valid for audience {audience!r}")
    user = status.get("user") or {}
    username = str(user.get("username", ""))
    namespace, _, name = username.removeprefix(SERVICE_ACCOUNT_USER_PREFIX).partition(":")
    if not username.startswith(SERVICE_ACCOUNT_USER_PREFIX) or not namespace or not name:
        raise refused("not_a_service_account", f"{username!r} is not a ServiceAccount")
    if (namespace, name) not in set(service_accounts):
        raise refused(
            "wrong_service_account", f"ServiceAccount {namespace}/{name} is not a node account"
        )
    extra = user.get("extra") or {}
    pod_names, pod_uids = extra.get(POD_NAME_EXTRA) or [], extra.get(POD_UID_EXTRA) or []
    if len(pod_names) != 1 or len(pod_uids) != 1 or not pod_names[0] or not pod_uids[0]:
        raise refused("not_pod_bound", "the token is not bound to a pod")
    return BoundPod((namespace, name), str(pod_names[0]), str(pod_uids[0]))


def check_pod(bound: BoundPod, pod: Mapping[str, Any] | None) -> str:
    """The node of the pod the token is bound to, or RequestRefusedError (UNAUTHENTICATED)."""
    namespace, account = bound.service_account
    where = f"{namespace}/{bound.pod_name}"
    if pod is None:
        raise refused("pod_gone", f"pod {where} the token is bound to does not exist")
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    if meta.get("uid") != bound.pod_uid:
        raise refused("pod_gone", f"pod {where} was replaced (uid differs from the token's)")
    if spec.get("serviceAccountName") != account:
        raise refused("pod_gone", f"pod {where} does not run as {namespace}/{account}")
    phase = (pod.get("status") or {}).get("phase")
    if phase in FINISHED_PHASES:
        raise refused("pod_gone", f"pod {where} has finished ({phase})")
    node = str(spec.get("nodeName") or "")
    if not node:
        raise refused("pod_gone", f"pod {where} is not scheduled on a node")
    return node


# A blocking TokenReview: token and audience in, the review's status out.
Review = Callable[[str, str], Mapping[str, Any]]
# A blocking pod read: (namespace, name) in, the pod or None (404) out.
ReadPod = Callable[[str, str], Mapping[str, Any] | None]


class TokenReviewAuthenticator:
    """NodeAuthenticator for Kubernetes mode; the blocking calls run in threads."""

    def __init__(
        self,
        review: Review,
        read_pod: ReadPod,
        *,
        audience: str,
        service_accounts: Sequence[tuple[str, str]],
        metrics: m.Metrics,
        ttl_s: float = CACHE_TTL_S,
        refusal_ttl_s: float = REFUSAL_TTL_S,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        run: Callable[..., Awaitable[Any]] = asyncio.to_thread,
    ) -> None:
        self._review = review
        self._read_pod = read_pod
        self._audience = audience
        self._service_accounts = frozenset(service_accounts)
        self._metrics = metrics
        self._ttl_s = min(ttl_s, 60.0)
        self._refusal_ttl_s = min(refusal_ttl_s, self._ttl_s)
        self._cache_size = cache_size
        self._clock = clock
        self._run = run
        # digest -> (expires at, node or the refusal)
        self._cache: OrderedDict[bytes, tuple[float, str | RequestRefusedError]] = OrderedDict()
        self._pending: dict[bytes, asyncio.Task[str | RequestRefusedError]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REVIEWS)
        self._refusals = LogLimiter()

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        try:
            token = bearer_token(metadata)
        except RequestRefusedError as refusal:
            self._refuse(refusal)
        digest = hashlib.sha256(token.encode()).digest()
        verdict = self._cached(digest)
        if verdict is None:
            # One review per token at a time, whoever asks meanwhile shares it;
            # it is its own task, so a caller that goes away does not cancel it.
            review = self._pending.get(digest)
            if review is None:
                review = asyncio.create_task(self._verdict(token))
                self._pending[digest] = review
                review.add_done_callback(lambda task: self._settled(digest, task))
            verdict = await asyncio.shield(review)
        if isinstance(verdict, RequestRefusedError):
            self._refuse(verdict)
        return verdict

    def _settled(self, digest: bytes, review: asyncio.Task[str | RequestRefusedError]) -> None:
        del self._pending[digest]
        if not review.cancelled() and review.exception() is None:
            self._remember(digest, review.result())

    def _refuse(self, refusal: RequestRefusedError) -> NoReturn:
        self._metrics.inc(m.NODE_AUTH_REFUSED, reason=refusal.reason)
        self._refusals.log(
            log, logging.WARNING, refusal.reason, "refused node token: %s", refusal.message
        )
        raise refusal

    async def _verdict(self, token: str) -> str | RequestRefusedError:
        """The node, or the refusal to cache; an API failure raises UNAVAILABLE (not cached)."""
        async with self._slots:
            try:
                status = await self._run(self._review, token, self._audience)
                bound = check_review(status, self._audience, self._service_accounts)
                pod = await self._run(self._read_pod, bound.service_account[0], bound.pod_name)
                return check_pod(bound, pod)
            except RequestRefusedError as refusal:
                return refusal
            except Exception as exc:
                self._metrics.inc(m.NODE_AUTH_REFUSED, reason="api_unavailable")
                self._refusals.log(
                    log, logging.WARNING, "api", "cannot check a node token: %s", exc
                )
                raise RequestRefusedError(
                    grpc.StatusCode.UNAVAILABLE,
                    "api_unavailable",
                    "cannot check the token with the Kubernetes API server now; retry",
                ) from exc

    def _cached(self, digest: bytes) -> str | RequestRefusedError | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return entry[1]

    def _remember(self, digest: bytes, verdict: str | RequestRefusedError) -> None:
        ttl = self._refusal_ttl_s if isinstance(verdict, RequestRefusedError) else self._ttl_s
        self._cache[digest] = (self._clock() + ttl, verdict)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def api_review(api_client: Any) -> Review:  # noqa: ANN401 (the client is untyped)
    """TokenReview through `api_client` (POST authentication.k8s.io/v1 tokenreviews)."""
    authentication = client.AuthenticationV1Api(api_client)

    def review(token: str, audience: str) -> Mapping[str, Any]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        }
        answer = call_json(authentication.create_token_review, body)
        status = answer.get("status")
        return status if isinstance(status, Mapping) else {}

    return review


def api_read_pod(api_client: Any) -> ReadPod:  # noqa: ANN401 (the client is untyped)
    """GET a pod through `api_client`; None when it does not exist."""
    core = client.CoreV1Api(api_client)

    def read_pod(namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            return call_json(core.read_namespaced_pod, name, namespace)
        except Exception as exc:
            if status_of(exc) == 404:
                return None
            raise

    return read_pod
