"""The TokenReview authenticator: what it accepts, what it refuses, how it caches."""

import asyncio
import contextlib

import grpc
import pytest

from controlplane import metrics as m
from controlplane.auth import RequestRefusedError
from controlplane.kubernetes.tokenreview import (
    BoundPod,
    TokenReviewAuthenticator,
    check_pod,
    check_review,
)
from weir_common.mesh import auth_metadata

ACCOUNTS = [("weir-system", "weir-agent"), ("weir-system", "weir-proxy")]
BOUND = BoundPod(("weir-system", "weir-agent"), "agent-x", "uid-1")


def review(
    user="system:serviceaccount:weir-system:weir-agent",
    audiences=("weir",),
    pod=("agent-x", "uid-1"),
    authenticated=True,
):
    extra = {}
    if pod is not None:
        extra = {
            "authentication.kubernetes.io/pod-name": [pod[0]],
            "authentication.kubernetes.io/pod-uid": [pod[1]],
            "authentication.kubernetes.io/node-name": ["n9"],
        }
    return {
        "authenticated": authenticated,
        "audiences": list(audiences),
        "user": {"username": user, "extra": extra},
    }


def agent_pod(uid="uid-1", node="n1", sa="weir-agent", phase="Running"):
    return {
        "metadata": {"name": "agent-x", "namespace": "weir-system", "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa},
        "status": {"phase": phase},
    }


def test_review_accepts_a_pod_bound_node_account_token():
    assert check_review(review(), "weir", ACCOUNTS) == BOUND
    proxy = review(user="system:serviceaccount:weir-system:weir-proxy")
    assert check_review(proxy, "weir", ACCOUNTS).service_account == ("weir-system", "weir-proxy")


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (review(authenticated=False), "token_invalid"),
        ({"authenticated": False, "error": "token expired"}, "token_invalid"),
        (review(audiences=("other",)), "wrong_audience"),
        (review(audiences=()), "wrong_audience"),
        (review(user="alice"), "not_a_service_account"),
        (review(user="system:serviceaccount:weir-system"), "not_a_service_account"),
        (review(user="system:serviceaccount:default:weir-agent"), "wrong_service_account"),
        (review(user="system:serviceaccount:weir-system:other"), "wrong_service_account"),
        (review(pod=None), "not_pod_bound"),
        (review(pod=("agent-x", "")), "not_pod_bound"),
    ],
)
def test_review_refusals(status, reason):
    with pytest.raises(RequestRefusedError) as refused:
        check_review(status, "weir", ACCOUNTS)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.reason == reason


def test_pod_gives_the_node_from_the_api_not_the_token():
    assert check_pod(BOUND, agent_pod()) == "n1"


@pytest.mark.parametrize(
    ("pod", "words"),
    [
        (None, "does not exist"),
        (agent_pod(uid="uid-2"), "replaced"),
        (agent_pod(sa="weir-proxy"), "does not run as"),
        (agent_pod(phase="Succeeded"), "finished"),
        (agent_pod(node=""), "not scheduled"),
    ],
)
def test_pod_refusals(pod, words):
    with pytest.raises(RequestRefusedError) as refused:
        check_pod(BOUND, pod)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert words in refused.value.message


class FakeApi:
    def __init__(self):
        self.reviews = {"good": review(), "other-sa": review(user="system:serviceaccount:a:b")}
        self.pods = {("weir-system", "agent-x"): agent_pod()}
        self.calls = []
        self.fail = False

    def review(self, token, audience):
        self.calls.append(("review", token, audience))
        if self.fail:
            raise ConnectionError("apiserver down")
        return self.reviews.get(token, {"authenticated": False, "error": "unknown token"})

    def read_pod(self, namespace, name):
        self.calls.append(("pod", namespace, name))
        return self.pods.get((namespace, name))


async def _direct(function, *args):
    await asyncio.sleep(0)
    return function(*args)


def authenticator(api, now, metrics=None, **kwargs):
    return TokenReviewAuthenticator(
        api.review,
        api.read_pod,
        audience="weir",
        service_accounts=ACCOUNTS,
        metrics=metrics or m.Metrics(),
        clock=lambda: now[0],
        run=_direct,
        **kwargs,
    )


def test_verdicts_are_cached_briefly_by_token():
    async def scenario():
        api, now, metrics = FakeApi(), [100.0], m.Metrics()
        auth = authenticator(api, now, metrics, ttl_s=30, refusal_ttl_s=5)
        assert await auth.authenticate(auth_metadata("good")) == "n1"
        assert await auth.authenticate(auth_metadata("good")) == "n1"
        assert len(api.calls) == 2  # one review, one pod read
        for _ in range(2):
            with pytest.raises(RequestRefusedError):
                await auth.authenticate(auth_metadata("other-sa"))
        assert len(api.calls) == 3
        assert metrics.value(m.NODE_AUTH_REFUSED, reason="wrong_service_account") == 2
        # The pod moved node (a new pod, same name, is never accepted: uid differs).
        api.pods[("weir-system", "agent-x")] = agent_pod(uid="uid-new")
        now[0] += 29
        assert await auth.authenticate(auth_metadata("good")) == "n1"
        now[0] += 2
        with pytest.raises(RequestRefusedError) as refused:
            await auth.authenticate(auth_metadata("good"))
        assert refused.value.reason == "pod_gone"

    asyncio.run(scenario())


def test_ttl_is_capped_and_the_cache_is_bounded():
    async def scenario():
        api, now = FakeApi(), [0.0]
        auth = authenticator(api, now, ttl_s=3600, cache_size=2)
        for token in ("good", "a", "b"):
            refusal = pytest.raises(RequestRefusedError)
            with refusal if token != "good" else contextlib.nullcontext():
                await auth.authenticate(auth_metadata(token))
        calls = len(api.calls)
        assert await auth.authenticate(auth_metadata("good")) == "n1"  # evicted: asked again
        assert len(api.calls) == calls + 2
        now[0] += 61
        assert await auth.authenticate(auth_metadata("good")) == "n1"
        assert len(api.calls) == calls + 4

    asyncio.run(scenario())


def test_concurrent_calls_share_one_review_and_api_failure_is_unavailable_uncached():
    async def scenario():
        api, now, metrics = FakeApi(), [0.0], m.Metrics()
        auth = authenticator(api, now, metrics)
        nodes = await asyncio.gather(*(auth.authenticate(auth_metadata("good")) for _ in range(5)))
        assert nodes == ["n1"] * 5
        assert len(api.calls) == 2
        api.fail = True
        for _ in range(2):
            with pytest.raises(RequestRefusedError) as refused:
                await auth.authenticate(auth_metadata("new-token"))
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert [c[0] for c in api.calls[2:]] == ["review", "review"]
        assert metrics.value(m.NODE_AUTH_REFUSED, reason="api_unavailable") == 2

    asyncio.run(scenario())


def test_missing_or_malformed_metadata_is_refused_without_an_api_call():
    async def scenario():
        api, metrics = FakeApi(), m.Metrics()
        auth = authenticator(api, [0.0], metrics)
        for metadata in ((), (("authorization", "Basic x"),)):
            with pytest.raises(RequestRefusedError) as refused:
                await auth.authenticate(metadata)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert api.calls == []
        assert metrics.value(m.NODE_AUTH_REFUSED, reason="unauthenticated") == 2

    asyncio.run(scenario())
