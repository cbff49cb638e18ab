"""What inbound and outbound share to carry a connection once they have accepted it.

Each direction is given these at construction (see `Proxy.__init__`):
`ConnectionTasks` runs each connection so shutdown can drain it,
`UpstreamConnector` dials from inside a pod's netns, `Refusals` answers bad
input, and `carry` reports a connection from open to close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, TypeVar

from mypy_extensions import mypyc_attr

from node_agent.proxy import tls_transport
from node_agent.proxy.hbone import Flow, HboneStream, TcpPeer
from node_agent.proxy.sockets import SocketFactory
from node_agent.proxy.state import PodState
from node_agent.proxy.telemetry import ConnectionRecord, ProxyMetrics, Telemetry
from weir_common.futures import fd_ready
from weir_common.log_limit import LogLimiter
from weir_common.mesh import SpiffeId

log = logging.getLogger(__name__)

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

CONNECTION_TASK: Final = "weir connection"


class UpstreamError(Exception):
    """This endpoint did not take the connection; another one may."""


def format_authority(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class UpstreamConnector:
    """Connections out of a pod's netns, marked (by the SocketFactory) so capture lets them by."""

    def __init__(
        self, sockets: SocketFactory, *, connect_timeout: float, handshake_timeout: float
    ) -> None:
        self._sockets = sockets
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._loop = _LoopCache()

    async def connect(
        self,
        pod: PodState,
        address: str,
        port: int,
        protocol: Callable[[], _P],
        tls: ssl.SSLContext | None = None,
    ) -> tuple[asyncio.Transport, _P]:
        """`protocol` connected to `address:port` from `pod`'s netns, over `tls` if given.

        The caller checks who answered: with `tls`, only that the peer chains
        to the context's trust bundle is known. Over `tls`, the protocol is
        lent what is read (TlsTransport's `lend_reads`): HBONE's is the one used.
        """
        loop = self._loop.get()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # Not in the try: failing to make a socket in the pod's netns is no fault of the upstream.
        sock = self._sockets.stream(pod.netns, family)
        try:
            await _connect(loop, sock, (address, port), self._connect_timeout)
            if tls is None:
                # uvloop's transport sets TCP_NODELAY itself.
                transport, plain = await loop.create_connection(protocol, sock=sock)
                if isinstance(plain, TcpPeer):
                    # Its lent writes go to the fd: known here, it costs no
                    # getsockname(2) for uvloop's socket object.
                    plain.fd = sock.fileno()
                return transport, plain
            # Frames are small and latency-bound (a CONNECT, a window update).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            secured = await tls_transport.handshake(
                sock, tls, server_side=False, timeout=self._handshake_timeout
            )
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            sock.close()
            raise UpstreamError(f"cannot connect to {address}:{port}: {str(e) or 'timeout'}") from e
        except BaseException:
            sock.close()
            raise
        connected = protocol()
        return tls_transport.TlsTransport(secured, connected, lend_reads=True), connected


async def _connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int], timeout: float
) -> None:
    """A non-blocking connect to a literal address, bounded by `timeout`.

    Not loop.sock_connect: uvloop resolves even a literal address there with
    getaddrinfo on its thread pool, a thread hop for every upstream connection.
    """
    error = sock.connect_ex(address)
    if error == errno.EINPROGRESS:
        # A pod on this node has usually answered by now: the SYN's softirq ran
        # the whole handshake on the way out of connect(2). Asking costs one
        # syscall; waiting costs a loop turn and four epoll_ctl(2).
        error = sock.connect_ex(address)
        if error == errno.EISCONN:
            return
    if error == 0:
        return
    if error not in (errno.EINPROGRESS, errno.EALREADY):
        raise OSError(error, os.strerror(error))
    # Rare (a peer on another node, a slow one): asyncio.timeout's cost does not matter here.
    async with asyncio.timeout(timeout):
        await fd_ready(loop.add_writer, loop.remove_writer, sock.fileno())
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


class _LoopCache:
    """The running loop, looked up once: on Python 3.11 each asyncio.get_running_loop()
    is a getpid(2), and these are asked for it on every connection. A closed loop
    (a test's previous one) is looked up again."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop


# The HBONE fuzz test counts the tasks with a subclass of its own.
@mypyc_attr(allow_interpreted_subclasses=True)
class ConnectionTasks:
    """One task per accepted connection, stream and handshake, kept so shutdown can drain them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = _LoopCache()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Named: on Python 3.11 an unnamed task formats "Task-<n>" for itself,
        # a visible share of a connection's setup.
        task = asyncio.Task(coro, loop=self._loop.get(), name=CONNECTION_TASK)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection handler failed", exc_info=task.exception())

    async def drain(self, deadline: float) -> None:
        """Wait up to `deadline` seconds for the running tasks to end, then cancel the rest."""
        pending = {t for t in self._tasks if not t.done()}
        if not pending:
            return
        log.info("draining %d connections for up to %.1f s", len(pending), deadline)
        _, still = await asyncio.wait(pending, timeout=deadline)
        for task in still:
            task.cancel()
        await asyncio.gather(*still, return_exceptions=True)


class Refusals:
    """Bad input, denials and silent peers: each counted, each kind logged at a bounded rate.

    Peers cause these at will; a line for every one would let them flood the log.
    """

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics
        # Replaceable: a fresh limiter gives every kind its first line again.
        self.limiter = LogLimiter()

    def refuse(self, listener: str, reason: str, detail: str, peer: TcpPeer | None) -> None:
        """Counted, logged, connection dropped; nothing else is affected."""
        self.limiter.log(
            log,
            logging.WARNING,
            (listener, reason),
            "%s: refused (%s): %s",
            listener,
            reason,
            detail,
        )
        self._metrics.refused(listener, reason)
        if peer is not None:
            peer.abort()

    def count(self, listener: str, reason: str) -> None:
        """Counted only: for refusals the caller reports in its own way."""
        self._metrics.refused(listener, reason)

    def silent_peer(self, direction: str, detail: str) -> None:
        """An HBONE connection given up because its peer answered no PING: counted and
        logged like a refusal (a dead node takes every connection to it at once)."""
        self._metrics.silent_peer(direction)
        self.limiter.log(
            log,
            logging.WARNING,
            (direction, "silent_peer"),
            "%s HBONE connection aborted: %s",
            direction,
            detail,
        )

    def denied(self, identity: SpiffeId | None, destination: str, reason: str) -> None:
        """A connection authorization denied (its metrics and access log are the caller's)."""
        self.limiter.log(
            log,
            logging.INFO,
            ("denied", identity, reason),
            "denied %s -> %s: %s",
            identity,
            destination,
            reason,
        )


async def carry(
    telemetry: Telemetry,
    record: ConnectionRecord,
    flow: Flow,
    peers: Sequence[TcpPeer],
    stream: HboneStream | None = None,
) -> None:
    """Report the connection open, wait for it to end, report it closed."""
    telemetry.opened(record, flow)
    try:
        error = await flow.done
    except asyncio.CancelledError:
        # Shutdown deadline passed: cut it, and still account for it.
        if stream is not None:
            stream.reset("proxy shutting down")
        for peer in peers:
            peer.abort()
        telemetry.closed(record, up=flow.up, down=flow.down, error="proxy shut down")
        raise
    telemetry.closed(record, up=flow.up, down=flow.down, error=error)
