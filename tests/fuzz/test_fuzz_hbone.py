"""HBONE: HTTP/2 bytes into H2Protocol, CONNECT requests into the inbound checks, authorities.

No sockets: an in-memory transport carries what the proxy writes. On the
receiving side every stream the peer opens is served by the real inbound
path (method, authority, the pod's own addresses, authorization) with an
upstream that never connects; every refusal it makes must be counted under
its reason, and an HTTP/2 protocol error must close the connection and be
counted too. Nothing may escape data_received or a stream's task.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Coroutine, Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_agent.proxy.connections import (
    ConnectionTasks,
    Refusals,
    UpstreamConnector,
    format_authority,
)
from node_agent.proxy.hbone import H2Protocol, HboneStream, Headers
from node_agent.proxy.inbound import _PROXY_PORTS, TUNNEL, Inbound, parse_authority
from node_agent.proxy.model import MeshSnapshot, Workload
from node_agent.proxy.state import PodState
from node_agent.proxy.telemetry import REFUSED, AccessLog, ProxyMetrics, Telemetry
from tests.fuzz.fuzzing import budget, file_timeout, inputs, regressions, seeds
from weir_common.mesh import SpiffeId

pytestmark = file_timeout()

REQUESTS = seeds("hbone")
RESPONSES = seeds("hbone_responses")
AUTHORITIES = seeds("authority")
SERVER = Workload(
    uid="1c7a",
    name="server",
    namespace="default",
    service_account="server",
    node="node-2",
    ips=("10.244.2.5", "fd00:10:244:2::5"),
)
CLIENT = Workload(
    uid="0b6f",
    name="client",
    namespace="default",
    service_account="client",
    node="node-1",
    ips=("10.244.1.17",),
)
SNAPSHOT = MeshSnapshot(
    trust_domain="cluster.local",
    trust_bundle_pem=(),
    workloads={w.key: w for w in (SERVER, CLIENT)},
)


# -- the authority parser --------------------------------------------------------


@pytest.mark.parametrize("value", regressions("authority"))
def test_authority_regression(value: bytes) -> None:
    _check_authority(value)


@budget(500)
@given(st.one_of(inputs(AUTHORITIES, max_ops=3), st.binary(max_size=40)))
def test_authority_is_parsed_or_refused(value: bytes) -> None:
    _check_authority(value)


def _check_authority(value: bytes) -> None:
    parsed = parse_authority(value)
    if parsed is None:
        return
    address, port = parsed
    assert 0 < port < 65536
    # What is accepted is an address and port, said again the same way.
    assert parse_authority(format_authority(address, port).encode()) == parsed
    assert value == value.strip() and b"\n" not in value


# -- an in-memory transport --------------------------------------------------------


class _Transport:
    """Enough of asyncio.Transport for H2Protocol; closing it ends the protocol, as TLS would."""

    def __init__(self, protocol: H2Protocol) -> None:
        self._protocol = protocol
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def writelines(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.244.1.17", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Tasks(ConnectionTasks):
    """ConnectionTasks that keeps the exception of a task that failed (a crash)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[BaseException] = []

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as e:
                self.failures.append(e)

        super().spawn(guarded())


class _ClosedSockets:
    """A SocketFactory whose sockets are closed already: every upstream connect fails
    (UpstreamError, answered 503), and nothing leaves the process."""

    def stream(self, _netns: Any, family: socket.AddressFamily) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.close()
        return sock


def _expected_refusal(pod: PodState, headers: Headers) -> str | None:
    """The reason the inbound path must count for this CONNECT, None if it passes the checks."""
    if headers.get(b":method") != b"CONNECT":
        return "not_connect"
    target = parse_authority(headers.get(b":authority"))
    if target is None:
        return "malformed_authority"
    address, port = target
    if address not in pod.addresses or port in _PROXY_PORTS:
        return "non_local_authority"
    return None


def _chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """`data` in pieces, as TCP and TLS may deliver it."""
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


def _serve(data: bytes, cuts: list[int]) -> None:
    """Feed `data` to a receiving proxy's connection; check crashes, closing and counting."""
    metrics = ProxyMetrics()
    tasks = _Tasks()
    inbound = Inbound(
        mesh=SimpleNamespace(snapshot=SNAPSHOT),  # type: ignore[arg-type]
        tls=None,  # type: ignore[arg-type]
        upstream=UpstreamConnector(
            _ClosedSockets(),  # type: ignore[arg-type]
            connect_timeout=1.0,
            handshake_timeout=1.0,
        ),
        tasks=tasks,
        refusals=Refusals(metrics),
        telemetry=Telemetry(metrics, AccessLog(lambda _line: None)),
        handshake_timeout=1.0,
        keepalive=None,
    )
    pod = PodState(
        netns=None,  # type: ignore[arg-type]
        workload=SERVER,
        identity=SpiffeId("cluster.local", "default", "server"),
    )
    expected: Counter[str] = Counter()

    def on_request(stream: HboneStream, headers: Headers) -> None:
        reason = _expected_refusal(pod, headers)
        if reason is not None:
            expected[reason] += 1
        inbound._request(pod, conn, stream, headers)

    conn = H2Protocol(
        client_side=False,
        on_request=on_request,
        on_closed=lambda c, reason: inbound._tunnel_closed(pod, c, reason),
    )
    conn.peer_identity = SpiffeId("cluster.local", "default", "client")

    async def run() -> None:
        transport = _Transport(conn)
        conn.connection_made(transport)  # type: ignore[arg-type]
        for chunk in _chunks(data, cuts):
            if transport.closed:
                break
            conn.data_received(chunk)
            await asyncio.sleep(0)
        await tasks.drain(2.0)
        if conn.protocol_error is not None:
            assert transport.closed, "a protocol error must close the connection"
            expected["http2_protocol_error"] += 1
        transport.close()
        await asyncio.sleep(0)

    asyncio.run(run())
    assert not tasks.failures, tasks.failures
    for reason, count in expected.items():
        assert metrics.value(REFUSED, listener=TUNNEL, reason=reason) == count, reason


@budget(300)
@given(inputs(REQUESTS, max_ops=4), st.lists(st.integers(0, 400), max_size=4))
def test_receiving_proxy_serves_or_refuses_every_byte_stream(data: bytes, cuts: list[int]) -> None:
    _serve(data, cuts)


def _receive_as_client(data: bytes, cuts: list[int]) -> None:
    conn = H2Protocol(client_side=True)

    async def run() -> None:
        transport = _Transport(conn)
        conn.connection_made(transport)  # type: ignore[arg-type]
        stream = conn.open_stream("10.244.2.5:8080")
        for chunk in _chunks(data, cuts):
            if transport.closed:
                break
            conn.data_received(chunk)
        transport.close()
        await asyncio.sleep(0)
        # Whatever came back, whoever waits on the stream gets an answer or an error.
        assert stream.response.done()

    asyncio.run(run())


@budget(200)
@given(inputs(RESPONSES, max_ops=4), st.lists(st.integers(0, 200), max_size=3))
def test_sending_proxy_reads_every_answer(data: bytes, cuts: list[int]) -> None:
    _receive_as_client(data, cuts)
