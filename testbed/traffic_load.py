"""Steady traffic through the mesh, and what happened to every connection of it.

Run inside pod network namespaces (as `python -m testbed.traffic_load`):

    serve --port P            an echo server
    drive --target IP:PORT    new connections at a fixed rate (each sends a
                              token and reads it back), plus long-lived
                              connections that echo every 100 ms and end
                              at given times (all started at once, or one
                              every few seconds); one JSON report on stdout

A new connection fails when it cannot connect, its echo is wrong or short,
or it takes longer than the timeout. A long-lived connection is reset when
anything but a clean close ends it: an error, a wrong echo, or EOF before
its end time. The proxies are what is measured, so the load is paced by
the clock, not by the answers (a slow answer does not slow the next
connection), and every loop is bounded by the run's duration.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Final

import uvloop

from node_agent.localmesh.sockets import open_connection
from node_agent.netns import Netns

TIMEOUT_S: Final = 5.0
TICK_S: Final = 0.1
MAX_IN_FLIGHT: Final = 4000


@dataclass
class Report:
    new_attempted: int = 0
    new_failed: int = 0
    new_failures: dict[str, int] = field(default_factory=dict)
    long_lived: int = 0
    long_lived_reset: int = 0
    long_lived_resets: list[str] = field(default_factory=list)
    long_lived_echoes: int = 0
    # The slowest new connections (seconds), to show a stall that did not fail.
    new_slowest: list[float] = field(default_factory=list)


def wait_serving(netns: Netns, port: int, timeout_s: float = 15.0) -> None:
    """Until `serve` in `netns` accepts on `port`: load started before it would fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            open_connection(netns, ipaddress.IPv4Address("127.0.0.1"), port, 1.0).close()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        return


async def serve(port: int) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096)  # noqa: S104
    print(f"serving on {port}", flush=True)
    async with server:
        await server.serve_forever()


class EchoMismatchError(ValueError):
    """The echo was not what was sent, or came after the end."""


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: bytes) -> None:
    writer.write(token)
    if await reader.readexactly(len(token)) != token:
        raise EchoMismatchError("wrong echo")


async def _close_cleanly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write_eof()
    if await reader.read() != b"":
        raise EchoMismatchError("data after the end")


_FAILURES = (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError)


class Driver:
    def __init__(self, host: str, port: int, long_lived: list[tuple[float, float]]) -> None:
        """`long_lived`: (start, end) of each, in seconds from the start of the run."""
        self.host = host
        self.port = port
        self.long_lived_spans = long_lived
        self.report = Report(long_lived=len(long_lived))
        self.failures: collections.Counter[str] = collections.Counter()
        self.durations: list[float] = []
        self.started = time.monotonic()

    async def run(self, rate: float, seconds: float) -> Report:
        tasks = [
            asyncio.create_task(self.long_lived(n, start, end))
            for n, (start, end) in enumerate(self.long_lived_spans)
        ]
        in_flight: set[asyncio.Task[None]] = set()
        total = int(rate * seconds)
        for n in range(total):
            delay = self.started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= MAX_IN_FLIGHT:
                self.failures["harness: too many connections in flight"] += 1
                continue
            task = asyncio.create_task(self.one(n))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight, *tasks)
        self.report.new_attempted = total
        self.report.new_failed = sum(self.failures.values())
        self.report.new_failures = dict(self.failures)
        self.report.new_slowest = sorted(self.durations)[-5:]
        return self.report

    async def one(self, n: int) -> None:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    await _echo(reader, writer, f"{n:012d}\n".encode())
                finally:
                    writer.close()
        except _FAILURES as e:
            self.failures[f"{type(e).__name__}: {e}"[:120]] += 1
        self.durations.append(time.monotonic() - t0)

    async def long_lived(self, n: int, start_at: float, end_at: float) -> None:
        writer: asyncio.StreamWriter | None = None
        await asyncio.sleep(max(0.0, self.started + start_at - time.monotonic()))
        try:
            async with asyncio.timeout(end_at - start_at + TIMEOUT_S):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                i = 0
                while time.monotonic() - self.started < end_at:
                    await _echo(reader, writer, f"long {n} {i}\n".encode())
                    self.report.long_lived_echoes += 1
                    i += 1
                    await asyncio.sleep(TICK_S)
                await _close_cleanly(reader, writer)
        except _FAILURES as e:
            self.report.long_lived_reset += 1
            self.report.long_lived_resets.append(
                f"#{n} at {time.monotonic() - self.started:.2f}s: {type(e).__name__}: {e}"[:200]
            )
        finally:
            if writer is not None:
                writer.close()


async def drive(
    host: str, port: int, rate: float, seconds: float, long_lived: list[tuple[float, float]]
) -> Report:
    return await Driver(host, port, long_lived).run(rate, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="traffic_load", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    serve_p = verbs.add_parser("serve")
    serve_p.add_argument("--port", type=int, required=True)
    drive_p = verbs.add_parser("drive")
    drive_p.add_argument("--target", required=True, metavar="IP:PORT")
    drive_p.add_argument("--rate", type=float, required=True, help="new connections per second")
    drive_p.add_argument("--seconds", type=float, required=True)
    drive_p.add_argument(
        "--long-lived-end",
        type=float,
        action="append",
        default=[],
        metavar="SECONDS",
        help="a long-lived connection from the start to this many seconds (repeatable)",
    )
    drive_p.add_argument(
        "--long-lived-every",
        type=float,
        metavar="SECONDS",
        help="also start a long-lived connection this often, each lasting --long-lived-for",
    )
    drive_p.add_argument("--long-lived-for", type=float, default=3.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    if args.verb == "serve":
        uvloop.run(serve(args.port))
        return 0
    host, _, port = args.target.rpartition(":")
    spans = [(0.0, end) for end in args.long_lived_end]
    if args.long_lived_every:
        count = int((args.seconds - args.long_lived_for) / args.long_lived_every)
        spans += [
            (i * args.long_lived_every, i * args.long_lived_every + args.long_lived_for)
            for i in range(max(0, count))
        ]
    report = uvloop.run(drive(host.strip("[]"), int(port), args.rate, args.seconds, spans))
    json.dump(asdict(report), sys.stdout)
    print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
