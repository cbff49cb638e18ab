"""A finished connection is freed by reference counting, not left to the cyclic GC.

Every proxied connection pairs a TcpPeer with what it feeds (a stream, a
relay), and each holds the other. Left as a cycle, a connection's objects
waited for a GC pass: under connection churn that was 7 % of a proxy's CPU.
These tests run with the collector off and look for the objects among those
the collector tracks once the connection has ended (not by weak reference:
the compiled modules' classes take none).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Iterator

import uvloop

from node_agent.proxy.hbone import Relay, TcpPeer
from tests.unit.test_hbone_pending import MemoryTransport, joined_pair, open_tunnel, shuttle


class WorkloadTransport(MemoryTransport):
    """A TCP connection in memory that ends as it is told, and says so as uvloop's do."""

    def __init__(self) -> None:
        super().__init__()
        self.eof = False
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write_eof(self) -> None:
        self.eof = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def close(self) -> None:
        protocol, self.protocol = self.protocol, None  # as uvloop lets go of its protocol
        if not self.closed and protocol is not None:
            asyncio.get_running_loop().call_soon(protocol.connection_lost, None)
        self.closed = True

    def abort(self) -> None:
        self.close()


def peer_in_memory() -> tuple[TcpPeer, WorkloadTransport]:
    transport = WorkloadTransport()
    peer = TcpPeer()
    transport.protocol = peer
    peer.connection_made(transport)
    return peer, transport


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def connected_peer() -> tuple[TcpPeer, socket.socket]:
    """A TcpPeer on one end of a socket pair, and the other end (non-blocking)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    peer = TcpPeer()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: peer, ours)
    return peer, theirs


class Watched:
    """Objects looked for later without holding them: by identity and type among the
    objects the collector tracks (every object that can be part of a cycle)."""

    def __init__(self, *objects: object) -> None:
        self._keys = {(id(o), type(o)) for o in objects}
        assert all(gc.is_tracked(o) for o in objects)

    def alive(self) -> list[str]:
        return sorted(type(o).__name__ for o in gc.get_objects() if (id(o), type(o)) in self._keys)


async def until_dead(watched: Watched) -> list[str]:
    """What is still alive after the loop has had a few turns to finish closing."""
    for _ in range(20):
        await asyncio.sleep(0)
        if not watched.alive():
            return []
    return watched.alive()


def test_a_finished_relay_is_freed_without_the_collector() -> None:
    async def main() -> None:
        downstream, client = await connected_peer()
        upstream, server = await connected_peer()
        relay = Relay(downstream, upstream)
        flow = relay.flow
        watched = Watched(downstream, upstream, relay)
        del downstream, upstream, relay
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(5):
            assert await flow.done is None
        assert await until_dead(watched) == []
        client.close()
        server.close()

    with collector_off():
        uvloop.run(main())


def test_a_finished_hbone_stream_is_freed_without_the_collector() -> None:
    async def main() -> None:
        ends, served = await joined_pair()
        stream, far = await open_tunnel(ends, served)

        peer, app = await connected_peer()
        stream.attach(peer)
        upstream, upstream_io = peer_in_memory()
        far.attach(upstream)
        flow = stream.flow
        watched = Watched(stream, peer)
        del stream, peer, far

        app.sendall(b"ping")
        app.shutdown(socket.SHUT_WR)  # the app is done sending
        async with asyncio.timeout(5):
            while upstream_io.pieces == []:
                await shuttle(*ends)
                await asyncio.sleep(0.01)
            assert upstream_io.take() == b"ping"
            upstream.eof_received()  # and so is the workload
            while not flow.done.done():
                await shuttle(*ends)
                await asyncio.sleep(0.01)
        assert flow.done.result() is None
        assert upstream_io.eof
        assert await until_dead(watched) == []
        app.close()

    with collector_off():
        uvloop.run(main())
