"""Worker processes: the node proxy on more than one core, one listener set each.

`weir proxy run --workers N` forks N-1 followers from the first process
(the leader) before any thread, socket or event loop exists. Each worker is
a whole proxy: its own control-plane session and certificates (keys made in
the worker, never leaving it), its own handoff connection to the node agent,
its own listeners in every pod netns. The listeners of one port in one pod
are a SO_REUSEPORT group, so the kernel spreads new connections over the
workers (by a hash of the 4-tuple, also for eBPF capture's sk_lookup, which
assigns the group); a connection stays with the worker that accepted it,
and the HBONE connection pools are per worker.

What operators read stays one per node. Only the leader listens on the
metrics, readiness and admin ports. Over a socketpair made before the fork
it asks each follower every second for a report (readiness and counters),
and on demand for a config_dump section. /metrics sums every worker's
counters, readiness is the leader's and every follower's, `connections` is
all of theirs; the `workers` section says who is who.

The group lives and dies together. A follower that exits on its own fails
the leader, which stops the others and exits non-zero (the kubelet then
restarts the container); a follower whose leader dies gets SIGTERM from the
kernel (PR_SET_PDEATHSIG) and drains. SIGTERM to the leader is passed on
at once, so every worker hands its pods over and drains at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from node_agent import libc
from node_agent.admin import log_ring
from node_agent.proxy.telemetry import OPENED, MetricValues, values_from_json
from node_agent.proxy_handoff.protocol import (
    GROUP_VERSION,
    MAX_WORKERS,
    SINGLE_PROCESS_HELLO,
    Hello,
)
from weir_common.errors import NodeSetupError

log = logging.getLogger(__name__)

REPORT_INTERVAL_SECONDS: Final = 1.0
ANSWER_TIMEOUT_SECONDS: Final = 5.0
# /metrics waits this long for fresh counters, then serves a slow worker's last
# report: the kubelet's liveness probe reads /metrics and gives up after 1 s.
FRESH_METRICS_TIMEOUT_SECONDS: Final = 0.5
# A follower that has not reported for this long has a stalled loop: not ready.
REPORT_STALE_SECONDS: Final = 5.0
# A follower's channel closing is taken for its failure only if its exit
# (which says how it died) has not been seen this long after.
EXIT_AFTER_EOF_SECONDS: Final = 1.0
# A busy worker's connections section (about 400 bytes per connection).
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
_PR_SET_PDEATHSIG: Final = 1


@dataclass(frozen=True)
class FollowerProcess:
    """A follower as its leader knows it."""

    index: int
    pid: int
    channel: socket.socket


@dataclass(frozen=True)
class _Worker:
    """Which of its proxy's `workers` processes this one is, and the group they share."""

    index: int
    workers: int
    group: str

    @property
    def hello(self) -> Hello:
        """What this worker says to the agent."""
        if self.workers == 1:
            # Version 2, which agents from before worker groups speak too.
            return SINGLE_PROCESS_HELLO
        return Hello(GROUP_VERSION, self.group, self.workers)


@dataclass(frozen=True)
class Leader(_Worker):
    """This process is worker 0: it forked `followers`."""

    followers: tuple[FollowerProcess, ...]


@dataclass(frozen=True)
class Follower(_Worker):
    """This process is worker `index`, forked by the leader, `channel` its line to it."""

    channel: socket.socket


Role = Leader | Follower


def fork(workers: int) -> Role:
    """Fork `workers` - 1 followers; returns in every process, saying which one it is.

    Call before any thread or event loop exists: fork copies the calling
    thread only, and a loop's epoll and signal fds would be shared.
    """
    if not 1 <= workers <= MAX_WORKERS:
        raise NodeSetupError(f"{workers} workers: from 1 to {MAX_WORKERS}")
    group = os.urandom(8).hex()
    leader = os.getpid()
    followers: list[FollowerProcess] = []
    for index in range(1, workers):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError as e:
            ours.close()
            theirs.close()
            for started in followers:
                os.kill(started.pid, signal.SIGKILL)
                os.waitpid(started.pid, 0)
            raise NodeSetupError(f"cannot start worker {index}: {e.strerror}") from None
        if pid == 0:
            ours.close()
            for sibling in followers:
                sibling.channel.close()
            _die_with(leader)
            return Follower(index, workers, group, channel=theirs)
        theirs.close()
        followers.append(FollowerProcess(index, pid, ours))
    return Leader(0, workers, group, followers=tuple(followers))


def _die_with(leader: int) -> None:
    """SIGTERM when the leader exits (it drains then, as on any stop)."""
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != leader:
        # The leader was gone before the death signal was set up.
        raise NodeSetupError("the first worker exited before this one started")


class _WorkerIndex(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def label_logs(role: Role) -> None:
    """Every log record of this process says its worker (a `worker` field in JSON and in
    the ring the first worker's /logs serves every worker's records from)."""
    if role.workers > 1:
        log_ring.process_ring()
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerIndex(role.index))


# -- the leader's side ---------------------------------------------------------


@dataclass
class _Report:
    at: float  # monotonic
    not_ready: str | None
    metrics: MetricValues


@dataclass
class _Peer:
    process: FollowerProcess
    writer: asyncio.StreamWriter | None = None
    reader_task: asyncio.Task[None] | None = None
    pidfd: int = -1
    signalled: bool = False  # sent SIGTERM: once, as a second one may land after its loop ended
    exit_code: int | None = None
    report: _Report | None = None
    report_error: str | None = None
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)


class WorkerGroup:
    """The leader's followers: their reports, readiness, counters, sections and end."""

    def __init__(self, followers: Sequence[FollowerProcess]) -> None:
        self._peers = [_Peer(f) for f in followers]
        self._next_id = 0
        self._stopping = False
        # Set when a follower is lost; whoever runs the leader stops it and exits non-zero.
        self.failed = asyncio.Event()
        self.failure = ""
        self._all_exited = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for peer in self._peers:
            reader, peer.writer = await asyncio.open_unix_connection(
                sock=peer.process.channel, limit=MAX_MESSAGE_BYTES
            )
            peer.reader_task = loop.create_task(self._read(peer, reader))
            peer.pidfd = os.pidfd_open(peer.process.pid)
            loop.add_reader(peer.pidfd, self._reap, peer)
        self._check_all_exited()

    # -- what the leader serves ------------------------------------------------

    def not_ready(self) -> str | None:
        """A readiness check: None while every follower reports itself ready."""
        now = time.monotonic()
        reasons = []
        for peer in self._peers:
            name = f"worker {peer.process.index} (pid {peer.process.pid})"
            report = peer.report
            if peer.exit_code is not None:
                reasons.append(f"{name} exited ({_exit_text(peer.exit_code)})")
            elif report is None:
                reasons.append(f"{name} has not reported yet")
            elif now - report.at > REPORT_STALE_SECONDS:
                why = f": {peer.report_error}" if peer.report_error else ""
                reasons.append(f"{name} has not reported for {now - report.at:.0f} s{why}")
            elif report.not_ready is not None:
                reasons.append(f"{name}: {report.not_ready}")
        return "; ".join(reasons) or None

    async def metric_values(self) -> list[MetricValues]:
        """Each follower's counters, asked for now (as last reported, for one slow to
        answer)."""
        await asyncio.gather(
            *(self._refresh(peer, FRESH_METRICS_TIMEOUT_SECONDS) for peer in self._peers)
        )
        return [peer.report.metrics for peer in self._peers if peer.report is not None]

    def dump(self, own: MetricValues) -> list[dict[str, Any]]:
        """The `workers` section: every worker, this one (counters `own`) first. How
        many connections each opened shows how evenly the kernel spreads them."""
        now = time.monotonic()
        rows: list[dict[str, Any]] = [
            {"worker": 0, "pid": os.getpid(), "leader": True, "connections_opened": _opened(own)}
        ]
        for peer in self._peers:
            report = peer.report
            rows.append(
                {
                    "worker": peer.process.index,
                    "pid": peer.process.pid,
                    "leader": False,
                    "connections_opened": _opened(report.metrics) if report else None,
                    "not_ready": report.not_ready if report else "has not reported yet",
                    "report_age_seconds": round(now - report.at, 3) if report else None,
                    "exit_code": peer.exit_code,
                }
            )
        return rows

    async def logs(self, lines: int) -> list[dict[str, Any]]:
        """Every follower's newest `lines` log records."""
        answers = await self._ask_all({"ask": "logs", "lines": lines})
        return [record for answer in answers for record in answer]

    async def sections(self, name: str) -> list[Any]:
        """Section `name` of every follower, in worker order."""
        return await self._ask_all({"ask": "section", "name": name})

    async def report(self) -> None:
        """Ask every follower for its report, every REPORT_INTERVAL_SECONDS, until cancelled."""
        while True:
            await asyncio.gather(*(self._refresh(peer) for peer in self._peers))
            await asyncio.sleep(REPORT_INTERVAL_SECONDS)

    # -- the end ---------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every follower still running: each hands over and drains on its own."""
        self._stopping = True
        for peer in self._peers:
            if peer.exit_code is None and not peer.signalled:
                peer.signalled = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(peer.process.pid, signal.SIGTERM)

    async def wait_exited(self, timeout: float) -> list[tuple[int, int]]:
        """(index, exit code) of followers that failed: each is waited for up to
        `timeout` seconds, then killed."""
        self.stop()
        try:
            await asyncio.wait_for(self._all_exited.wait(), timeout)
        except TimeoutError:
            for peer in self._peers:
                if peer.exit_code is None:
                    log.warning(
                        "worker %d (pid %d) still runs %.0f s after SIGTERM: killing it",
                        peer.process.index,
                        peer.process.pid,
                        timeout,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(peer.process.pid, signal.SIGKILL)
            await self._all_exited.wait()
        return [(p.process.index, p.exit_code) for p in self._peers if p.exit_code]

    async def close(self) -> None:
        for peer in self._peers:
            if peer.reader_task is not None:
                peer.reader_task.cancel()
                await asyncio.gather(peer.reader_task, return_exceptions=True)
            if peer.writer is not None:
                peer.writer.close()
            else:
                peer.process.channel.close()
            if peer.pidfd >= 0:
                asyncio.get_running_loop().remove_reader(peer.pidfd)
                os.close(peer.pidfd)
                peer.pidfd = -1

    # -- underneath ------------------------------------------------------------

    async def _refresh(self, peer: _Peer, timeout: float = ANSWER_TIMEOUT_SECONDS) -> None:
        if peer.exit_code is not None:
            return
        try:
            answer = await self._ask(peer, {"ask": "report"}, timeout)
            peer.report = _Report(
                at=time.monotonic(),
                not_ready=_reason(answer["not_ready"]),
                metrics=values_from_json(answer["metrics"]),
            )
            peer.report_error = None
        except (ConnectionError, TimeoutError, KeyError, TypeError, ValueError) as e:
            peer.report_error = str(e) or type(e).__name__

    async def _ask_all(self, request: dict[str, Any]) -> list[Any]:
        return list(await asyncio.gather(*(self._ask(p, request) for p in self._peers)))

    async def _ask(
        self, peer: _Peer, request: dict[str, Any], timeout: float = ANSWER_TIMEOUT_SECONDS
    ) -> Any:  # noqa: ANN401 - JSON
        writer = peer.writer
        if writer is None or writer.is_closing():
            raise ConnectionError(f"worker {peer.process.index} is not connected")
        self._next_id += 1
        request_id = self._next_id
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        peer.pending[request_id] = answer
        try:
            writer.write(json.dumps({**request, "id": request_id}).encode() + b"\n")
            async with asyncio.timeout(timeout):
                await writer.drain()
                return await answer
        except TimeoutError:
            raise TimeoutError(
                f"worker {peer.process.index} did not answer within {timeout:g} s"
            ) from None
        finally:
            peer.pending.pop(request_id, None)

    async def _read(self, peer: _Peer, reader: asyncio.StreamReader) -> None:
        error: Exception = ConnectionError(f"worker {peer.process.index} closed its channel")
        try:
            while line := await reader.readline():
                reply = json.loads(line)
                waiter = peer.pending.get(reply.get("id"))
                if waiter is None or waiter.done():
                    continue  # asked, then given up on
                if "error" in reply:
                    waiter.set_exception(
                        RuntimeError(f"worker {peer.process.index}: {reply['error']}")
                    )
                else:
                    waiter.set_result(reply.get("answer"))
        except (ConnectionError, ValueError, asyncio.LimitOverrunError) as e:
            error = ConnectionError(f"worker {peer.process.index}'s channel failed: {e}")
        for waiter in peer.pending.values():
            if not waiter.done():
                waiter.set_exception(error)
        asyncio.get_running_loop().call_later(
            EXIT_AFTER_EOF_SECONDS, self._channel_lost, peer, error
        )

    def _channel_lost(self, peer: _Peer, error: Exception) -> None:
        if not self._stopping and peer.exit_code is None:
            self._fail(str(error))

    def _reap(self, peer: _Peer) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(peer.pidfd)
        os.close(peer.pidfd)
        peer.pidfd = -1
        _, status = os.waitpid(peer.process.pid, 0)
        peer.exit_code = os.waitstatus_to_exitcode(status)
        if not self._stopping:
            self._fail(
                f"worker {peer.process.index} (pid {peer.process.pid}) exited "
                f"({_exit_text(peer.exit_code)})"
            )
        self._check_all_exited()

    def _check_all_exited(self) -> None:
        if all(peer.exit_code is not None for peer in self._peers):
            self._all_exited.set()

    def _fail(self, reason: str) -> None:
        if self.failed.is_set():
            return
        log.critical("proxy stopping: %s", reason)
        self.failure = reason
        self.failed.set()


def _reason(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"a report's not_ready is {value!r}")
    return value


def _opened(values: MetricValues) -> int:
    return int(sum(values.get(OPENED, {}).values()))


def _exit_text(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"status {code}"


# -- a follower's side ---------------------------------------------------------

Answer = Callable[[dict[str, Any]], Any]


async def serve_leader(channel: socket.socket, answer: Answer) -> None:
    """Answer the leader's asks until it closes the channel (it is gone)."""
    reader, writer = await asyncio.open_unix_connection(sock=channel, limit=MAX_MESSAGE_BYTES)
    try:
        while line := await reader.readline():
            request = json.loads(line)
            try:
                result = answer(request)
                if inspect.isawaitable(result):
                    result = await result
                reply = {"id": request.get("id"), "answer": result}
            except Exception as e:
                log.exception("answering the first worker's %s failed", request.get("ask"))
                reply = {"id": request.get("id"), "error": str(e) or type(e).__name__}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, ValueError, asyncio.LimitOverrunError) as e:
        log.warning("the channel to the first worker failed: %s", e)
    finally:
        writer.close()
