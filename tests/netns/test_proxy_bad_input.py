"""Bad input at a proxy's doors: refused or cleaned up, counted, logged once, and the
proxy goes on serving everyone else."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import socket
import ssl
import struct
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest

from controlplane.ca import load_or_create_root
from node_agent.netns import entered
from node_agent.proxy import tls
from node_agent.proxy.telemetry import CLOSED, REFUSED
from testbed.proxy_fakes import LocalCaCertificates
from testbed.proxy_lab import LAB_SETTINGS, EchoServer, MeshLab, open_lab
from weir_common.log_limit import LogLimiter
from weir_common.mesh import SpiffeId

pytestmark = pytest.mark.netns

APP_PORT = 8080
TUNNEL = 15008
SETTINGS = dataclasses.replace(LAB_SETTINGS, handshake_timeout=1.0, tunnel_idle_timeout=1.5)
PLAIN = SpiffeId("cluster.local", "default", "plain")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    with open_lab(tmp_path_factory.mktemp("bad-input"), SETTINGS) as lab:
        lab.add_node("node-1", "10.244.1.0/24")
        lab.add_node("node-2", "10.244.2.0/24")
        lab.add_pod("node-1", "a")
        lab.add_pod("node-2", "b")
        lab.add_pod("node-1", "plain", captured=False)  # where the attacker sits
        server = EchoServer(lab.pods["b"], APP_PORT)
        try:
            yield lab
        finally:
            server.close()


@pytest.fixture
def b_metrics(lab):
    return lab.nodes["node-2"].proxy.metrics


@pytest.fixture(autouse=True)
def fresh_refusal_log(lab):
    """Each case starts with a fresh log budget: refusals of one kind are
    logged once per interval, and the cases share one proxy."""
    for node in lab.nodes.values():
        node.proxy.refusal_log = LogLimiter()


def _socket_from(lab: MeshLab, pod: str) -> socket.socket:
    with entered(lab.pods[pod].netns):
        return socket.socket()


def raw_connection(lab: MeshLab) -> socket.socket:
    """TCP from the uncaptured pod straight to b's tunnel port."""
    sock = _socket_from(lab, "plain")
    sock.settimeout(5)
    sock.connect((str(lab.pods["b"].ipv4), TUNNEL))
    return sock


def mtls_connection(lab: MeshLab, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    if context is None:
        cert = LocalCaCertificates(lab.ca).issue(PLAIN)
        context = tls.client_context(cert, lab.ca.trust_bundle_pem)
    return context.wrap_socket(raw_connection(lab), server_hostname=None)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer closed (EOF or reset), reading past what it sent first
    (HTTP/2 settings); False if it stays open for the socket's timeout."""
    try:
        for _ in range(100):
            if sock.recv(4096) == b"":
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return False


def still_serving(lab: MeshLab) -> None:
    with _socket_from(lab, "a") as s:
        s.settimeout(5)
        s.connect((str(lab.pods["b"].ipv4), APP_PORT))
        s.sendall(b"still there?")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(64) == b"still there?"


def refusals(caplog: pytest.LogCaptureFixture, reason: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"({reason})" in r.getMessage()]


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x00\xff" * 300, "tls_wrong_version_number"),
        (b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", "tls_http_request"),
        (b"\x16\x03\x01\x00\x05hello", "tls_"),  # a TLS record header with junk inside
    ],
    ids=["garbage", "plain-http", "broken-tls-record"],
)
def test_not_tls_is_refused_counted_and_logged_once(lab, b_metrics, caplog, payload, reason):
    before = b_metrics.value(REFUSED, listener="tunnel")
    with raw_connection(lab) as sock:
        sock.sendall(payload)
        assert closed_by_peer(sock)
    wait_for(lambda: b_metrics.value(REFUSED, listener="tunnel") == before + 1)
    assert len([r for r in caplog.records if "refused (tls_" in r.getMessage()]) == 1
    assert any(reason in r.getMessage() for r in caplog.records)
    still_serving(lab)


def test_tls_client_without_certificate_is_refused(lab, b_metrics, caplog):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    reason = "tls_peer_did_not_return_a_certificate"
    before = b_metrics.value(REFUSED, reason=reason)
    with (
        contextlib.suppress(ssl.SSLError, ConnectionResetError),
        mtls_connection(lab, context) as sock,
    ):
        assert closed_by_peer(sock)
    wait_for(lambda: b_metrics.value(REFUSED, reason=reason) == before + 1)
    assert len(refusals(caplog, reason)) == 1
    still_serving(lab)


def test_client_certificate_from_another_ca_is_refused(lab, b_metrics, caplog, tmp_path):
    foreign = load_or_create_root(tmp_path / "foreign", "cluster.local", now=_now())
    rogue = LocalCaCertificates(foreign).issue(PLAIN)
    context = tls.client_context(rogue, lab.ca.trust_bundle_pem)
    reason = "tls_certificate_verify_failed"
    before = b_metrics.value(REFUSED, reason=reason)
    with (
        contextlib.suppress(ssl.SSLError, ConnectionResetError),
        mtls_connection(lab, context) as sock,
    ):
        assert closed_by_peer(sock)
    wait_for(lambda: b_metrics.value(REFUSED, reason=reason) == before + 1)
    assert len(refusals(caplog, reason)) == 1
    still_serving(lab)


def _now():
    return datetime.datetime.now(datetime.UTC)


class H2Client:
    """Just enough of an HTTP/2 client to send what a well-behaved one would not."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, method: bytes, authority: bytes) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(b":method", method), (b":authority", authority)]
        if method != b"CONNECT":
            headers += [(b":scheme", b"https"), (b":path", b"/")]
        self.conn.send_headers(stream_id, headers)
        self.flush()
        return stream_id

    def events(self) -> list[h2.events.Event]:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        found = self.conn.receive_data(data)
        self.flush()
        return found

    def status(self, stream_id: int) -> bytes:
        for _ in range(20):  # bounded: a handful of frames (settings, acks) come first
            for event in self.events():
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    return dict(event.headers)[b":status"]
        raise AssertionError("no response")


@pytest.mark.parametrize(
    ("method", "authority", "status", "reason"),
    [
        (b"CONNECT", b"a-host-name:8080", b"400", "malformed_authority"),
        (b"CONNECT", b"10.244.2.2", b"400", "malformed_authority"),
        (b"CONNECT", b"[10.244.2.2]:8080", b"400", "malformed_authority"),
        (b"CONNECT", b"10.244.2.2:99999", b"400", "malformed_authority"),
        (b"CONNECT", b"NONLOCAL", b"400", "non_local_authority"),
        (b"CONNECT", b"LOCAL:15008", b"400", "non_local_authority"),
        (b"GET", b"LOCAL:8080", b"405", "not_connect"),
    ],
    ids=["name", "no-port", "v4-in-brackets", "port-range", "other-pod", "loop", "get"],
)
def test_bad_requests_on_a_good_connection(
    lab, b_metrics, caplog, method, authority, status, reason
):
    b_ip, a_ip = str(lab.pods["b"].ipv4).encode(), str(lab.pods["a"].ipv4).encode()
    authority = authority.replace(b"NONLOCAL", a_ip + b":8080").replace(b"LOCAL", b_ip)
    before = b_metrics.value(REFUSED, reason=reason)
    with mtls_connection(lab) as sock:
        client = H2Client(sock)
        assert client.status(client.request(method, authority)) == status
        # The connection stays usable: a good stream on it still works.
        good = client.request(b"CONNECT", b_ip + b":%d" % APP_PORT)
        assert client.status(good) == b"200"
    assert b_metrics.value(REFUSED, reason=reason) == before + 1
    assert len(refusals(caplog, reason)) == 1
    still_serving(lab)


def test_a_refusal_repeated_at_will_is_counted_every_time_but_logged_once(lab, b_metrics, caplog):
    reason = "not_connect"
    b_ip = str(lab.pods["b"].ipv4).encode()
    before = b_metrics.value(REFUSED, reason=reason)
    with mtls_connection(lab) as sock:
        client = H2Client(sock)
        for _ in range(5):
            assert client.status(client.request(b"GET", b_ip + b":8080")) == b"405"
    assert b_metrics.value(REFUSED, reason=reason) == before + 5
    assert len(refusals(caplog, reason)) == 1


def test_http2_garbage_after_tls_is_refused(lab, b_metrics, caplog):
    reason = "http2_protocol_error"
    before = b_metrics.value(REFUSED, reason=reason)
    with mtls_connection(lab) as sock:
        # The client preface, then DATA on stream 0, which HTTP/2 forbids.
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        assert closed_by_peer(sock)
    wait_for(lambda: b_metrics.value(REFUSED, reason=reason) == before + 1)
    assert len(refusals(caplog, reason)) == 1
    still_serving(lab)


def test_stalled_handshake_is_cut_at_the_deadline(lab, b_metrics, caplog):
    reason = "tls_handshake_timeout"
    before = b_metrics.value(REFUSED, reason=reason)
    with raw_connection(lab) as sock:
        started = time.monotonic()
        assert closed_by_peer(sock)  # we never said a word
        assert 0.5 < time.monotonic() - started < 4
    wait_for(lambda: b_metrics.value(REFUSED, reason=reason) == before + 1)
    assert len(refusals(caplog, reason)) == 1
    still_serving(lab)


def test_silent_client_after_tls_is_closed_when_idle(lab):
    with mtls_connection(lab) as sock:
        sock.settimeout(6)
        started = time.monotonic()
        assert closed_by_peer(sock)
        assert 1.0 < time.monotonic() - started < 5
    still_serving(lab)


def test_reset_mid_stream_cleans_up_the_upstream(lab, b_metrics):
    b_ip = str(lab.pods["b"].ipv4).encode()
    proxy = lab.nodes["node-2"].proxy
    closed_before = b_metrics.value(CLOSED, source_principal=str(PLAIN))
    sock = mtls_connection(lab)
    client = H2Client(sock)
    stream_id = client.request(b"CONNECT", b_ip + b":%d" % APP_PORT)
    assert client.status(stream_id) == b"200"
    client.conn.send_data(stream_id, b"half a message")
    client.flush()
    echoed = b""
    for _ in range(20):
        for event in client.events():
            if isinstance(event, h2.events.DataReceived):
                echoed += event.data
        if echoed:
            break
    assert echoed == b"half a message"
    entries = lab.nodes["node-2"].access_log.entries
    logged_before = len(entries)  # the stream is still open: not logged yet
    # Linger 0: closing sends a TCP RST in the middle of the stream.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    wait_for(lambda: len(entries) > logged_before)  # the log line comes after the counters
    assert b_metrics.value(CLOSED, source_principal=str(PLAIN)) == closed_before + 1
    entry = entries[-1]
    assert entry["outcome"] == "error"
    assert entry["bytes_received"] == len(b"half a message")
    wait_for(lambda: proxy.dump()["active_connections"] == 0)
    still_serving(lab)
