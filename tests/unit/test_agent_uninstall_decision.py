"""Uninstall or upgrade at SIGTERM: every case of the decision, and the API adapter's bounds."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from node_agent.kubernetes.uninstall import (
    Answer,
    Evidence,
    UninstallCheck,
    daemonset_owner,
    decide,
)

NS, POD, DS_UID = "weir-system", "weir-agent-x7k2p", "ds-uid-1"
DELETING = {"deletionTimestamp": "2026-01-01T00:00:00Z"}


def namespace(**meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": NS, **meta}}


def agent_pod(owners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if owners is None:
        owners = [
            {
                "apiVersion": "apps/v1",
                "kind": "DaemonSet",
                "name": "weir-agent",
                "uid": DS_UID,
                "controller": True,
            }
        ]
    return {"metadata": {"name": POD, "namespace": NS, "ownerReferences": owners}}


def daemonset(uid: str = DS_UID, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": "weir-agent", "namespace": NS, "uid": uid, **meta}}


def ok(obj: dict[str, Any]) -> Answer:
    return Answer(200, obj)


def evidence(
    ns: Answer | None = None,
    pod: Answer | None = None,
    ds: Answer | None = None,
    watched: dict[str, Any] | None = None,
) -> Evidence:
    return Evidence(NS, POD, watched, ns, pod, ds)


def normal(ds: Answer | None, watched: dict[str, Any] | None = None) -> Evidence:
    """The namespace and the agent's pod as they are in a running cluster."""
    return evidence(ok(namespace()), ok(agent_pod()), ds, watched)


NO_ANSWER = Answer(None, error="TimeoutError()")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        (evidence(watched=namespace(**DELETING)), "namespace weir-system is being deleted (seen"),
        # The watch saw it even though the token no longer works.
        (
            evidence(Answer(401), Answer(401), watched=namespace(**DELETING)),
            "namespace weir-system is being deleted (seen",
        ),
        (evidence(ok(namespace(**DELETING)), NO_ANSWER), "namespace weir-system is being deleted"),
        (
            normal(Answer(404, error="Not Found")),
            "DaemonSet weir-system/weir-agent is gone",
        ),
        (
            normal(ok(daemonset(**DELETING))),
            "DaemonSet weir-system/weir-agent is being deleted",
        ),
        (
            evidence(Answer(403), Answer(403)),
            "the agent's RBAC grants are gone: every request was refused",
        ),
    ],
)
def test_uninstall_on_positive_evidence(case: Evidence, reason: str) -> None:
    verdict = decide(case)
    assert verdict.uninstall
    assert verdict.reason.startswith(reason)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        # A rolling update, a drain, a deleted or restarted agent pod.
        (normal(ok(daemonset())), "DaemonSet weir-system/weir-agent is in place"),
        # Deleted and created again under the same name: its agent takes over.
        (
            normal(ok(daemonset(uid="ds-uid-2"))),
            "DaemonSet weir-system/weir-agent was replaced",
        ),
        (
            evidence(ok(namespace()), ok(agent_pod(owners=[]))),
            "pod weir-system/weir-agent-x7k2p is not run by a DaemonSet",
        ),
        # A force-deleted pod's bound token is refused as a deleted ServiceAccount's is.
        (evidence(Answer(401), Answer(401)), "401 is no evidence"),
        (evidence(Answer(403), Answer(401)), "401 is no evidence"),
        # Some grants answered, one refused: RBAC changed, it was not deleted.
        (evidence(ok(namespace()), Answer(403)), "no evidence of an uninstall"),
        (normal(Answer(403)), "no evidence of an uninstall"),
        (evidence(NO_ANSWER, NO_ANSWER), "no evidence of an uninstall (namespace: no answer"),
        (evidence(), "no evidence of an uninstall (nothing asked)"),
        (normal(Answer(500, error="Internal")), "no evidence of an uninstall"),
        (normal(NO_ANSWER), "no evidence of an uninstall"),
        (evidence(ok(namespace()), Answer(404)), "no evidence of an uninstall"),
        (
            normal(ok(daemonset()), watched=namespace()),
            "DaemonSet weir-system/weir-agent is in place",
        ),
    ],
)
def test_anything_else_keeps_capture(case: Evidence, reason: str) -> None:
    verdict = decide(case)
    assert not verdict.uninstall
    assert verdict.reason.startswith(reason), verdict.reason


def test_the_owner_is_the_controlling_daemonset_only() -> None:
    assert daemonset_owner(agent_pod()) == ("weir-agent", DS_UID)
    not_controller = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "u"}
    replicaset = {**not_controller, "kind": "ReplicaSet", "controller": True}
    other_group = {**not_controller, "apiVersion": "example.com/v1", "controller": True}
    for owners in ([not_controller], [replicaset], [other_group], []):
        assert daemonset_owner(agent_pod(owners=owners)) is None
    assert daemonset_owner({}) is None


class Response:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.data = json.dumps(obj).encode()

    def release_conn(self) -> None:
        return None


class FakeApi:
    """CoreV1Api and AppsV1Api in one: canned objects, exceptions, or a stall."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.api_client = None
        self.timeouts: list[float] = []

    def _answer(self, what: str, kwargs: dict[str, Any]) -> Response:
        assert kwargs["_preload_content"] is False
        self.timeouts.append(kwargs["_request_timeout"])
        answer = self.answers[what]
        if isinstance(answer, float):
            time.sleep(answer)
            raise TimeoutError("read timed out")
        if isinstance(answer, BaseException):
            raise answer
        return Response(answer)

    def read_namespace(self, name: str, **kwargs: Any) -> Response:
        assert name == NS
        return self._answer("namespace", kwargs)

    def read_namespaced_pod(self, name: str, ns: str, **kwargs: Any) -> Response:
        assert (name, ns) == (POD, NS)
        return self._answer("pod", kwargs)

    def read_namespaced_daemon_set(self, name: str, ns: str, **kwargs: Any) -> Response:
        assert (name, ns) == ("weir-agent", NS)
        return self._answer("daemonset", kwargs)

    def list_namespace(self, **kwargs: Any) -> None:
        raise AssertionError("not watched in these tests")


def check(api: FakeApi, timeout_s: float = 5.0) -> UninstallCheck:
    return UninstallCheck(api, POD, NS, timeout_s=timeout_s, apps=api)  # type: ignore[arg-type]


def test_the_daemonset_is_found_through_the_pod_and_asked_about() -> None:
    api = FakeApi(
        namespace=namespace(), pod=agent_pod(), daemonset=ApiException(status=404, reason="NF")
    )
    verdict = asyncio.run(check(api).verdict())
    assert verdict.uninstall
    assert verdict.reason == "DaemonSet weir-system/weir-agent is gone"
    assert len(api.timeouts) == 3
    assert all(0 < t <= 5.0 for t in api.timeouts)


def test_refusals_and_connection_errors_become_answers() -> None:
    refused = ApiException(status=403, reason="Forbidden")
    assert asyncio.run(check(FakeApi(namespace=refused, pod=refused)).verdict()).uninstall
    down = ConnectionRefusedError("no route")
    verdict = asyncio.run(check(FakeApi(namespace=down, pod=down)).verdict())
    assert not verdict.uninstall
    assert "ConnectionRefusedError" in verdict.reason


def test_a_stalled_api_server_is_waited_for_no_longer_than_the_timeout() -> None:
    api = FakeApi(namespace=namespace(), pod=3.0)
    started = time.monotonic()
    verdict = asyncio.run(check(api, timeout_s=0.5).verdict())
    assert time.monotonic() - started < 1.0
    assert not verdict.uninstall
    assert verdict.reason == "no evidence of an uninstall (namespace: 200)"


def test_the_namespace_watch_is_evidence_whatever_the_api_answers_later() -> None:
    unauthorized = ApiException(status=401, reason="Unauthorized")
    probe = check(FakeApi(namespace=unauthorized, pod=unauthorized))
    probe.replace("agent namespace", [namespace()])
    assert not asyncio.run(probe.verdict()).uninstall
    probe.event("agent namespace", "MODIFIED", namespace(**DELETING))
    assert asyncio.run(probe.verdict()).uninstall
