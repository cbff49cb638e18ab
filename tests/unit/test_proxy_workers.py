"""Worker processes: the first worker's view of the others, and what carries it.

The followers here are stand-ins: a `sleep` process for the pid the first
worker watches, and `serve_leader` on the other end of a real socketpair for
the channel, so reports, sections, exits and stops go the real way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop

from node_agent.proxy import workers
from node_agent.proxy.access_log_writer import whole_line_chunks
from node_agent.proxy.telemetry import (
    ACCESS_LOG_DROPPED,
    FAILED,
    OPENED,
    ProxyMetrics,
    render,
    summed,
    values_from_json,
    values_to_json,
)
from node_agent.proxy_handoff import protocol
from node_agent.proxy_handoff.agent_side import successor_groups

SOURCE = (("reporter", "source"), ("source_workload", "a"))
DESTINATION = (("reporter", "destination"), ("source_workload", "a"))


def metrics(opened: float, failed: float = 0.0) -> ProxyMetrics:
    m = ProxyMetrics()
    m.inc(OPENED, SOURCE, opened)
    if failed:
        m.inc(FAILED, DESTINATION, failed)
    m.observe(ACCESS_LOG_DROPPED, lambda: 2.0)
    return m


# -- counters across workers -----------------------------------------------------


def test_counters_survive_the_trip_between_workers() -> None:
    values = metrics(3, failed=1).values()
    # Counters with no series yet carry nothing: the first worker's own give their HELP.
    assert values_from_json(values_to_json(values)) == {k: v for k, v in values.items() if v}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"a": 1}, TypeError),
        ([["no_such_counter", [], 1]], ValueError),
        ([[OPENED, [["reporter"]], 1]], ValueError),
        ([[OPENED, [["reporter", 1]], 1]], ValueError),
        ([[OPENED, [], True]], ValueError),
        ([[OPENED, [], "1"]], ValueError),
        ([[OPENED, []]], ValueError),
    ],
)
def test_counters_that_are_not_ours_are_refused(data: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        values_from_json(data)


def test_the_first_worker_serves_every_workers_counters_summed() -> None:
    first, second = metrics(3), metrics(4, failed=1)
    text = first.render([second.values()])
    assert 'istio_tcp_connections_opened_total{reporter="source",source_workload="a"} 7' in text
    assert 'istio_tcp_connections_failed_total{reporter="destination",source_workload="a"} 1' in (
        text
    )
    assert "weir_proxy_access_log_dropped_total 4" in text
    # One HELP per counter, in the usual order, whatever the others sent.
    assert text.count("# HELP istio_tcp_connections_opened_total") == 1
    assert text == render(summed(first.values(), second.values()))
    assert first.render() == render(first.values())
    rows = first.traffic([second.values()])
    assert [(row["reporter"], row["opened"], row["failed"]) for row in rows] == [
        ("destination", 0, 1),
        ("source", 7, 0),
    ]


# -- the handoff's worker groups ----------------------------------------------------


def test_a_worker_says_its_group_and_an_agent_checks_it() -> None:
    hello = protocol.Hello(protocol.GROUP_VERSION, "g1", 4)
    assert protocol.expect_hello(hello.to_json()) == hello
    assert protocol.expect_hello({"type": "hello", "version": 2, "group": "ignored"}) == (
        protocol.Hello(2)
    )
    for bad in (
        {"type": "hello", "version": 3, "workers": 2},
        {"type": "hello", "version": 3, "group": "", "workers": 2},
        {"type": "hello", "version": 3, "group": "g" * 65, "workers": 2},
        {"type": "hello", "version": 3, "group": "g", "workers": 0},
        {"type": "hello", "version": 3, "group": "g", "workers": 65},
        {"type": "hello", "version": 3, "group": "g", "workers": True},
        {"type": "hello", "version": 4, "group": "g", "workers": 2},
    ):
        with pytest.raises(protocol.ProtocolError):
            protocol.expect_hello(bad)


class Conn:
    def __init__(self, group: str, workers: int, order: int, synced: bool) -> None:
        self.group, self.workers, self.order, self.synced = group, workers, order, synced


def test_a_group_is_one_successor_holding_every_pod_once_all_its_workers_do() -> None:
    old = [Conn("old", 2, 1, True), Conn("old", 2, 2, True)]
    assert successor_groups(old) == {"old": (0, 0)}
    new = [Conn("new", 2, 3, True), Conn("new", 2, 4, False)]
    assert successor_groups([*old, *new]) == {"old": (1, 0), "new": (0, 0)}
    new[1].synced = True
    assert successor_groups([*old, *new]) == {"old": (1, 1), "new": (0, 0)}
    # A single-process proxy after both: a successor of each.
    single = Conn("#5", 1, 5, True)
    assert successor_groups([*old, *new, single]) == {"old": (2, 2), "new": (1, 1), "#5": (0, 0)}


def test_access_log_writes_are_whole_lines_each_small_enough_to_stay_whole() -> None:
    lines = ["a" * 10, "b" * 10, "c" * 30, "d" * 5]
    chunks = whole_line_chunks(lines, 25)
    assert chunks == [b"a" * 10 + b"\n" + b"b" * 10 + b"\n", b"c" * 30 + b"\n", b"d" * 5 + b"\n"]
    assert b"".join(chunks) == "".join(f"{line}\n" for line in lines).encode()


# -- the first worker and a follower ---------------------------------------------------


class StandIn:
    """A follower: a process to watch and a channel that answers like one."""

    def __init__(self, index: int, answer: workers.Answer) -> None:
        self.process = subprocess.Popen(["sleep", "60"])
        ours, theirs = socket.socketpair()
        self.follower = workers.FollowerProcess(index, self.process.pid, ours)
        self.task = asyncio.get_running_loop().create_task(workers.serve_leader(theirs, answer))

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


def answering(not_ready: str | None, opened: float) -> workers.Answer:
    def answer(request: dict[str, Any]) -> Any:
        if request["ask"] == "report":
            return {
                "not_ready": not_ready,
                "metrics": values_to_json(metrics(opened).values()),
            }
        if request["ask"] == "section" and request["name"] == "connections":
            return [{"age_seconds": opened}]
        raise ValueError(f"no {request}")

    return answer


@contextlib.asynccontextmanager
async def group(
    *answers: workers.Answer,
) -> AsyncIterator[tuple[workers.WorkerGroup, list[StandIn]]]:
    stand_ins = [StandIn(i + 1, answer) for i, answer in enumerate(answers)]
    leader = workers.WorkerGroup([s.follower for s in stand_ins])
    await leader.start()
    try:
        yield leader, stand_ins
    finally:
        for stand_in in stand_ins:
            await stand_in.close()
        await leader.wait_exited(5.0)
        await leader.close()


def test_the_first_worker_gathers_readiness_counters_and_sections() -> None:
    async def scenario() -> None:
        async with group(answering(None, 3), answering("stopping", 4)) as (leader, _):
            assert leader.not_ready() is not None and "has not reported yet" in leader.not_ready()
            others = await leader.metric_values()
            assert [sum(v[OPENED].values()) for v in others] == [3, 4]
            reason = leader.not_ready()
            assert (
                reason is not None and reason.startswith("worker 2 (pid ") and "stopping" in reason
            )
            assert await leader.sections("connections") == [
                [{"age_seconds": 3}],
                [{"age_seconds": 4}],
            ]
            with pytest.raises(RuntimeError, match="worker 1: no "):
                await leader.sections("pool")
            table = leader.dump(metrics(5).values())
            assert [(row["worker"], row["connections_opened"]) for row in table] == [
                (0, 5),
                (1, 3),
                (2, 4),
            ]
            assert not leader.failed.is_set()

    uvloop.run(asyncio.wait_for(scenario(), 20))


def test_a_follower_that_dies_fails_the_first_worker_and_the_others_are_stopped() -> None:
    async def scenario() -> None:
        async with group(answering(None, 1), answering(None, 1)) as (leader, stand_ins):
            stand_ins[0].process.kill()
            await asyncio.wait_for(leader.failed.wait(), 5)
            assert leader.failure == (
                f"worker 1 (pid {stand_ins[0].process.pid}) exited (killed by SIGKILL)"
            )
            assert "worker 1" in (leader.not_ready() or "")
            # Stopping the rest: SIGTERM, once, which `sleep` dies of.
            failed = await leader.wait_exited(5.0)
            assert failed == [(1, -signal.SIGKILL), (2, -signal.SIGTERM)]

    uvloop.run(asyncio.wait_for(scenario(), 20))


def test_a_follower_slow_to_answer_counts_with_its_last_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/metrics does not wait on it (the liveness probe reads /metrics), and readiness
    says it has gone quiet once its report is stale."""
    answered: list[int] = []
    prompt = answering(None, 3)

    def slows_down(request: dict[str, Any]) -> Any:
        if answered:
            return asyncio.sleep(3600)
        answered.append(1)
        return prompt(request)

    monkeypatch.setattr(workers, "FRESH_METRICS_TIMEOUT_SECONDS", 0.2)
    monkeypatch.setattr(workers, "REPORT_STALE_SECONDS", 0.3)

    async def scenario() -> None:
        async with group(slows_down) as (leader, _):
            assert [sum(v[OPENED].values()) for v in await leader.metric_values()] == [3]
            started = asyncio.get_running_loop().time()
            assert [sum(v[OPENED].values()) for v in await leader.metric_values()] == [3]
            assert asyncio.get_running_loop().time() - started < 1.0
            assert leader.not_ready() is None
            await asyncio.sleep(0.4)
            reason = leader.not_ready()
            assert reason is not None and "has not reported for" in reason
            assert "did not answer within 0.2 s" in reason
            assert not leader.failed.is_set()

    uvloop.run(asyncio.wait_for(scenario(), 20))
