"""Agent -> proxy handoff: datagrams the proxy decodes and applies.

A datagram is a message of the protocol or a ProtocolError with a message.
Applying one either works, nacks that pod alone (a refusal with its reason),
or ends the session with a ProtocolError; never anything else. Every netns fd
that came with a message is either held for its pod or closed.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.netns import Netns
from node_agent.proxy_handoff import protocol
from node_agent.proxy_handoff.protocol import EnrolledPod, ProtocolError
from node_agent.proxy_handoff.proxy_side import ProxyHandoffClient, _PodRefusedError
from tests.fuzz.fuzzing import (
    budget,
    file_timeout,
    inputs,
    json_seeds,
    mutated_json,
    regressions,
    seeds,
)

pytestmark = file_timeout()

DATAGRAMS = seeds("handoff")
MESSAGES = json_seeds("handoff")


def _check_datagram(data: bytes) -> None:
    try:
        message = protocol.decode(data)
    except ProtocolError as e:
        assert e.message
        return
    assert isinstance(message["type"], str)
    if message["type"] == "hello":
        try:
            protocol.expect_hello(message)
        except ProtocolError as e:
            assert e.message
    if message["type"] == "add":
        _check_pod(message.get("pod"))


@pytest.mark.parametrize("data", regressions("handoff"))
def test_regression_datagram(data: bytes) -> None:
    _check_datagram(data)


@budget(400)
@given(
    st.one_of(
        inputs(DATAGRAMS),
        mutated_json(MESSAGES).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_datagram_decodes_or_is_refused(data: bytes) -> None:
    _check_datagram(data)


PODS = [m["pod"] for m in MESSAGES if m["type"] == "add"]


@budget(300)
@given(mutated_json(PODS))
def test_pod_is_read_or_refused(data: object) -> None:
    _check_pod(data)


def _check_pod(data: object) -> None:
    try:
        pod = EnrolledPod.from_json(data)
    except ProtocolError as e:
        assert e.message
        return
    # Taken only as sent: strings, and addresses that parse (nothing coerced by str()).
    assert isinstance(data, dict) and pod.uid
    sent = {key: data[key] for key in ("uid", "name", "namespace", "service_account")}
    assert pod.to_json() == {**sent, "ips": tuple(data["ips"])}
    assert all(ipaddress.ip_address(ip) for ip in pod.ips)


class _FakePods:
    """A PodHandler that takes any pod and refuses the uid 'refuse-me'."""

    def __init__(self) -> None:
        self.pods: dict[str, EnrolledPod] = {}

    async def add_pod(self, pod: EnrolledPod, netns: Netns) -> None:
        if pod.uid == "refuse-me":
            raise protocol.ProtocolError("this pod is refused")
        self.pods[pod.uid] = pod

    async def remove_pod(self, uid: str) -> None:
        self.pods.pop(uid, None)


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    try:
        yield event_loop
    finally:
        event_loop.close()


MESSAGE_INPUTS = st.one_of(
    st.sampled_from(MESSAGES),
    mutated_json(MESSAGES),
    mutated_json([{**m, "pod": {**m["pod"], "uid": "refuse-me"}} for m in MESSAGES if "pod" in m]),
).filter(lambda m: isinstance(m, dict) and isinstance(m.get("type"), str))
# What may come with a message: the pod's netns, nothing, too many, or a file that is no netns.
FD_KINDS = st.sampled_from(("netns", "none", "two", "devnull"))


@pytest.mark.netns
def test_messages_are_applied_nacked_or_refused(
    bare_netns: Netns, loop: asyncio.AbstractEventLoop
) -> None:
    handler = _FakePods()
    client = ProxyHandoffClient(bare_netns.path, handler)

    def fds_for(kind: str) -> list[int]:
        netns = os.open(bare_netns.path, os.O_RDONLY | os.O_CLOEXEC)
        if kind == "netns":
            return [netns]
        if kind == "two":
            return [netns, os.dup(netns)]
        os.close(netns)
        return [] if kind == "none" else [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]

    @settings(budget(200), suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(MESSAGE_INPUTS, FD_KINDS), min_size=1, max_size=6))
    def check(session: list[tuple[dict[str, Any], str]]) -> None:
        handed: set[int] = set()
        in_snapshot: set[str] | None = set()
        for message, kind in session:
            fds = fds_for(kind)
            handed.update(fds)
            try:
                in_snapshot = loop.run_until_complete(client._apply(message, fds, in_snapshot))
            except _PodRefusedError as e:
                assert e.reason
            except ProtocolError as e:
                assert e.message
        leaked = {fd for fd in handed - set(client._fds.values()) if _is_open(fd)}
        assert not leaked, f"fds {leaked} that came with messages are neither held nor closed"
        assert set(client._fds) == set(handler.pods)
        loop.run_until_complete(client._apply({"type": "snapshot_done"}, [], set()))
        assert client._fds == {}

    check()
