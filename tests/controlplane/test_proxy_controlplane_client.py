"""The node proxy's gRPC client (node_agent.proxy.controlplane): against the real control
plane over TLS, and against an h2 (python-hyper) server for what a control plane may do
that ours does not on demand."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import uvloop
from cp_testing import (
    FAST_BACKOFF,
    MESH_YAML,
    TOKENS,
    RecordingHandler,
    endpoint,
    root_file,
    running_plane,
)
from cryptography import x509

from node_agent.controlplane_access import ControlPlaneEndpoint, StaticToken, Status
from node_agent.proxy.controlplane import (
    CONTROLPLANE_KEEPALIVE,
    ProxyControlPlaneClient,
    RpcError,
    split_target,
)
from node_agent.proxy.http2.keepalive import KeepaliveSettings
from testbed.proxy_fakes import self_signed_root_pem
from weir_common.errors import InvalidInputError
from weir_common.mesh import WORKLOAD_TYPE

pytestmark = pytest.mark.timeout(60)

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"  # runs on node-1
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"  # runs on node-2


def _client(
    plane_endpoint: ControlPlaneEndpoint, node: str = "node-1", token: str = ""
) -> ProxyControlPlaneClient:
    return ProxyControlPlaneClient(
        plane_endpoint,
        node,
        StaticToken(token or TOKENS[node]),
        backoff=FAST_BACKOFF,
        connect_timeout=2.0,
        resume_settle=0.1,
    )


@contextlib.asynccontextmanager
async def _running(coro: object) -> AsyncIterator[None]:
    task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- against the control plane -------------------------------------------------------


def test_takes_the_mesh_and_certificates_for_its_own_workloads_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_plane(tmp_path) as plane, _client(endpoint(plane, tmp_path)) as client:
            handler = RecordingHandler()
            subscription = client.subscribe(handler)
            async with _running(subscription.run()):
                await handler.wait_for(lambda: len(handler.states) == 4)
                assert set(handler.states[WORKLOAD_TYPE]) == {"default/client", "default/server"}
                assert subscription.connected.is_set() and subscription.not_connected() is None

                issued = await client.request_certificate(CLIENT_ID, validity_seconds=3600)
                leaf = x509.load_pem_x509_certificate(issued.chain_pem[0].encode())
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [CLIENT_ID]
                assert issued.trust_bundle_pem and b"PRIVATE KEY" in issued.private_key_pem

                # The CA signs only what the requesting node hosts.
                with pytest.raises(RpcError) as refused:
                    await client.request_certificate(SERVER_ID)
                assert refused.value.status == Status.PERMISSION_DENIED

    uvloop.run(scenario())  # as the proxy runs it


def test_resumes_from_held_versions_after_a_control_plane_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        handler = RecordingHandler()
        async with running_plane(tmp_path) as first:
            port = first.grpc_port
            client = _client(endpoint(first, tmp_path))
            subscription = client.subscribe(handler)
            task = asyncio.create_task(subscription.run())
            await handler.wait_for(lambda: len(handler.states) == 4)
        try:
            async with asyncio.timeout(5):
                while subscription.connected.is_set():
                    await asyncio.sleep(0.01)
            assert "UNAVAILABLE" in (subscription.not_connected() or "")
            assert len(handler.states[WORKLOAD_TYPE]) == 2  # kept meanwhile
            handler.updates.clear()
            extra = (
                "  - {name: extra, namespace: default, serviceAccount: extra, node: node-2, "
                "labels: {app: server}}\n"
            )
            changed = MESH_YAML.replace("services:\n", extra + "services:\n")
            async with running_plane(tmp_path, changed, f"127.0.0.1:{port}"):
                await handler.wait_for(lambda: "default/extra" in handler.states[WORKLOAD_TYPE])
            # Resumed: only the difference came, not the two workloads held.
            assert [u for u in handler.updates if u[0] == WORKLOAD_TYPE] == [
                (WORKLOAD_TYPE, ["default/extra"], [])
            ]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            client.close()

    uvloop.run(scenario())  # as the proxy runs it


def test_a_refused_token_an_impostor_and_silence_are_told_apart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_plane(tmp_path) as plane:
            async with _client(endpoint(plane, tmp_path), token="not-the-token") as client:
                with pytest.raises(RpcError) as refused:
                    await client.request_certificate(CLIENT_ID)
                assert refused.value.status == Status.UNAUTHENTICATED

            impostor_roots = tmp_path / "other-root.pem"
            impostor_roots.write_text(self_signed_root_pem())
            target = f"127.0.0.1:{plane.grpc_port}"
            async with _client(ControlPlaneEndpoint.tls(target, impostor_roots)) as client:
                with pytest.raises(RpcError, match="CERTIFICATE_VERIFY_FAILED") as impostor:
                    await client.request_certificate(CLIENT_ID)
                assert impostor.value.status == Status.UNAVAILABLE

        # Gone: nothing listens there any more.
        async with _client(ControlPlaneEndpoint.tls(target, root_file(tmp_path))) as client:
            with pytest.raises(RpcError, match="cannot connect") as gone:
                await client.request_certificate(CLIENT_ID)
            assert gone.value.status == Status.UNAVAILABLE

    uvloop.run(scenario())  # as the proxy runs it


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("weir-controlplane.weir-system.svc:15012", ("weir-controlplane.weir-system.svc", 15012)),
        ("10.0.0.1:15012", ("10.0.0.1", 15012)),
        ("[fd00::1]:15012", ("fd00::1", 15012)),
    ],
)
def test_targets(target: str, expected: tuple[str, int]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target", ["controlplane", "controlplane:", ":15012", "fd00::1:15012", "[zz]:1", "h:70000"]
)
def test_bad_targets_are_refused_when_the_client_is_made(target: str) -> None:
    with pytest.raises(InvalidInputError, match="is not host:port"):
        ProxyControlPlaneClient(ControlPlaneEndpoint.insecure(target), "node-1", StaticToken("t"))


# -- against an h2 server ------------------------------------------------------------

OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def grpc_message(payload: bytes, *, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(payload).to_bytes(4, "big") + payload


@dataclass
class Request:
    stream_id: int
    headers: dict[bytes, bytes]
    body: bytearray = field(default_factory=bytearray)


# What the server does with a complete request: send frames through the h2 connection.
Answer = Callable[[h2.connection.H2Connection, Request], None]


class H2Server:
    """Plaintext HTTP/2 (prior knowledge) on loopback, answering each request once its
    body is complete; counts connections and the resets it receives."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.resets: list[tuple[int, int]] = []
        self.requests: list[Request] = []
        self.live: list[h2.connection.H2Connection] = []
        self._writers: list[asyncio.StreamWriter] = []
        # Connections (by number, from 1) that read and answer nothing more,
        # their sockets left open: a control plane behind a cut link.
        self.silent: set[int] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.append(writer)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.live.append(conn)
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        pending: dict[int, Request] = {}
        while data := await reader.read(65536):
            if number in self.silent:
                await asyncio.Future()  # until the test ends
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    pending[event.stream_id] = Request(event.stream_id, dict(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    pending[event.stream_id].body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    request = pending.pop(event.stream_id)
                    self.requests.append(request)
                    self.answer(conn, request)
                elif isinstance(event, h2.events.StreamReset):
                    self.resets.append((event.stream_id, event.error_code))
            writer.write(conn.data_to_send())
            await writer.drain()

    def push(self, conn: h2.connection.H2Connection) -> None:
        """Send what an answer queued outside a read (a later frame)."""
        self.send_raw(conn, conn.data_to_send())

    def send_raw(self, conn: h2.connection.H2Connection, data: bytes) -> None:
        self._writers[self.live.index(conn)].write(data)


def goaway(*, last_stream_id: int, code: int = 0) -> bytes:
    payload = last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big")
    return len(payload).to_bytes(3, "big") + bytes([7, 0]) + (0).to_bytes(4, "big") + payload


@contextlib.asynccontextmanager
async def h2_server(
    answer: Answer, keepalive: KeepaliveSettings = CONTROLPLANE_KEEPALIVE
) -> AsyncIterator[tuple[H2Server, ProxyControlPlaneClient]]:
    server = H2Server(answer)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = _client(ControlPlaneEndpoint.insecure(f"127.0.0.1:{port}"), token="t0ken")
    client.keepalive = keepalive
    try:
        yield server, client
    finally:
        client.close()
        listener.close()
        for writer in server._writers:
            writer.close()


def send_in_window(conn: h2.connection.H2Connection, stream_id: int, data: bytes) -> bytes:
    """As much of `data` as the window lets through now; the rest."""
    size = min(len(data), conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
    if size:
        conn.send_data(stream_id, data[:size])
    return data[size:]


def test_a_large_call_crosses_the_flow_control_windows_both_ways() -> None:
    """A 1.5 MiB request against h2's 64 KiB windows, a 3 MiB answer against ours."""
    request = bytes(range(256)) * 6144
    answer_payload = request * 2
    left: dict[int, bytes] = {}

    def echo_twice(conn: h2.connection.H2Connection, req: Request) -> None:
        assert req.headers[b"content-type"] == b"application/grpc"
        assert req.headers[b"te"] == b"trailers"
        assert req.headers[b"authorization"] == b"Bearer t0ken"
        assert req.headers[b":path"] == b"/test.Echo/Twice"
        assert bytes(req.body) == grpc_message(request)
        conn.send_headers(req.stream_id, OK_HEADERS)
        left[req.stream_id] = grpc_message(answer_payload)
        left[req.stream_id] = send_in_window(conn, req.stream_id, left[req.stream_id])

    async def scenario() -> None:
        async with h2_server(echo_twice) as (server, client):
            call = asyncio.create_task(client.unary("/test.Echo/Twice", request, 10))
            # Our windows (1 MiB per stream) make the server wait for our updates.
            async with asyncio.timeout(10):
                while not call.done():
                    await asyncio.sleep(0.01)
                    for conn in server.live:
                        for stream_id, rest in list(left.items()):
                            if rest:
                                left[stream_id] = send_in_window(conn, stream_id, rest)
                            elif conn.state_machine.state.name != "CLOSED":
                                conn.send_headers(
                                    stream_id, [(b"grpc-status", b"0")], end_stream=True
                                )
                                del left[stream_id]
                        server.push(conn)
            assert call.result() == answer_payload
            await asyncio.sleep(0.1)
            assert server.resets == []  # both sides ended it: nothing to reset

    uvloop.run(scenario())  # as the proxy runs it


@pytest.mark.parametrize(
    ("headers", "data", "trailers", "status", "details"),
    [
        # Trailers-only, with a percent-encoded message.
        (
            [*OK_HEADERS, (b"grpc-status", b"7"), (b"grpc-message", b"no%20way%20%E2%9C%93")],
            None,
            None,
            Status.PERMISSION_DENIED,
            "no way \u2713",
        ),
        ([(b":status", b"503")], None, None, Status.UNAVAILABLE, "HTTP status 503"),
        ([(b":status", b"404")], None, None, Status.UNIMPLEMENTED, "HTTP status 404"),
        (
            [(b":status", b"200"), (b"content-type", b"text/html")],
            None,
            None,
            Status.UNKNOWN,
            "text/html",
        ),
        (
            OK_HEADERS,
            grpc_message(b"x", compressed=True),
            [(b"grpc-status", b"0")],
            Status.INTERNAL,
            "compressed",
        ),
        (
            OK_HEADERS,
            grpc_message(b"x"),
            [(b"grpc-message", b"lost")],
            Status.UNKNOWN,
            "grpc-status",
        ),
        (
            OK_HEADERS,
            grpc_message(b"xyz")[:-1],
            [(b"grpc-status", b"0")],
            Status.INTERNAL,
            "inside a message",
        ),
        (
            OK_HEADERS,
            grpc_message(b"a") + grpc_message(b"b"),
            [(b"grpc-status", b"0")],
            Status.INTERNAL,
            "more than one",
        ),
        (OK_HEADERS, None, [(b"grpc-status", b"0")], Status.INTERNAL, "no message"),
    ],
)
def test_what_an_answer_says_becomes_the_calls_status(
    headers: list[tuple[bytes, bytes]],
    data: bytes | None,
    trailers: list[tuple[bytes, bytes]] | None,
    status: Status,
    details: str,
) -> None:
    def answer(conn: h2.connection.H2Connection, req: Request) -> None:
        conn.send_headers(req.stream_id, headers, end_stream=data is None and trailers is None)
        if data is not None:
            conn.send_data(req.stream_id, data, end_stream=trailers is None)
        if trailers is not None:
            conn.send_headers(req.stream_id, trailers, end_stream=True)

    async def scenario() -> None:
        async with h2_server(answer) as (_, client):
            with pytest.raises(RpcError, match=details) as failed:
                await client.unary("/test.Echo/Once", b"ping", 5)
            assert failed.value.status == status

    uvloop.run(scenario())  # as the proxy runs it


def test_an_unanswered_call_gives_up_at_its_deadline_and_cancels_the_stream() -> None:
    async def scenario() -> None:
        async with h2_server(lambda conn, req: None) as (server, client):
            with pytest.raises(RpcError, match=r"no answer in 0\.3 s") as late:
                await client.unary("/test.Echo/Never", b"ping", 0.3)
            assert late.value.status == Status.DEADLINE_EXCEEDED
            (request,) = server.requests
            assert request.headers[b"grpc-timeout"] == b"300m"
            async with asyncio.timeout(5):
                while not server.resets:
                    await asyncio.sleep(0.01)
            assert server.resets == [(request.stream_id, h2.errors.ErrorCodes.CANCEL)]

    uvloop.run(scenario())  # as the proxy runs it


def test_after_goaway_the_open_call_finishes_and_the_next_dials_anew() -> None:
    held: list[tuple[h2.connection.H2Connection, int]] = []

    def answer(conn: h2.connection.H2Connection, req: Request) -> None:
        if req.headers[b":path"] == b"/test.Echo/Slow":
            held.append((conn, req.stream_id))
            return
        conn.send_headers(req.stream_id, OK_HEADERS)
        conn.send_data(req.stream_id, grpc_message(b"fresh"))
        conn.send_headers(req.stream_id, [(b"grpc-status", b"0")], end_stream=True)

    async def scenario() -> None:
        async with h2_server(answer) as (server, client):
            slow = asyncio.create_task(client.unary("/test.Echo/Slow", b"ping", 5))
            async with asyncio.timeout(5):
                while not held:
                    await asyncio.sleep(0.01)
            conn, stream_id = held[0]
            # GOAWAY covering the slow call, built here: h2 would close its side for good.
            server.send_raw(conn, goaway(last_stream_id=stream_id))
            await asyncio.sleep(0.1)
            # The GOAWAY reached the client: a new call goes on a new connection.
            assert await client.unary("/test.Echo/Fast", b"ping", 5) == b"fresh"
            assert server.connections == 2
            # The covered call still gets its answer on the old one.
            conn.send_headers(stream_id, OK_HEADERS)
            conn.send_data(stream_id, grpc_message(b"late"))
            conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
            server.push(conn)
            assert await slow == b"late"

    uvloop.run(scenario())  # as the proxy runs it


def test_a_control_plane_gone_silent_fails_the_open_call_and_the_next_dials_anew() -> None:
    """A quiet control plane that answers PINGs keeps the connection; one that
    answers nothing within the keepalive timeout loses it, and the call on it
    (a config stream would wait forever) fails UNAVAILABLE."""

    def answer(conn: h2.connection.H2Connection, req: Request) -> None:
        if req.headers[b":path"] == b"/test.Echo/Fast":
            conn.send_headers(req.stream_id, OK_HEADERS)
            conn.send_data(req.stream_id, grpc_message(b"fresh"))
            conn.send_headers(req.stream_id, [(b"grpc-status", b"0")], end_stream=True)

    async def scenario() -> None:
        keepalive = KeepaliveSettings(interval=0.2, timeout=0.3)
        async with h2_server(answer, keepalive) as (server, client):
            loop = asyncio.get_running_loop()
            held = asyncio.create_task(client.unary("/test.Echo/Held", b"ping", 30))
            await asyncio.sleep(2.5)  # five quiet spells: h2 answers each PING
            assert not held.done() and server.connections == 1
            server.silent.add(1)
            muted = loop.time()
            with pytest.raises(RpcError, match=r"answered no PING within 0\.3 s") as lost:
                await asyncio.wait_for(held, 3.0)
            assert lost.value.status == Status.UNAVAILABLE
            assert loop.time() - muted <= 1.5
            assert await client.unary("/test.Echo/Fast", b"ping", 5) == b"fresh"
            assert server.connections == 2

    uvloop.run(scenario())  # as the proxy runs it


def test_a_token_that_cannot_be_read_sends_nothing() -> None:
    class NoToken:
        def token(self) -> str:
            raise InvalidInputError("no token (test)")

    async def scenario() -> None:
        async with h2_server(lambda conn, req: None) as (server, client):
            client._token = NoToken()
            with pytest.raises(InvalidInputError, match="no token"):
                await client.unary("/test.Echo/Once", b"ping", 5)
            assert server.connections == 0

    uvloop.run(scenario())  # as the proxy runs it
