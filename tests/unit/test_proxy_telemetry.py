"""istio_tcp_* metrics and the JSON access log, as operators read them."""

from __future__ import annotations

import asyncio
import json
import time

import uvloop

from node_agent.proxy.model import Service, ServicePort, Workload
from node_agent.proxy.telemetry import (
    CLOSED,
    FAILED,
    OPENED,
    RECEIVED,
    SENT,
    AccessLog,
    ConnectionRecord,
    MetricsServer,
    ProxyMetrics,
    Telemetry,
)
from weir_common.mesh import SpiffeId

A = Workload("u1", "a", "web", "a-sa", "node-1", ("10.244.1.2",))
B = Workload("u2", "b", "prod", "b-sa", "node-2", ("10.244.2.2",))
SVC = Service("b", "prod", ("10.96.0.10",), (ServicePort(80, 8080),), ("prod/b",))


def record(**changes) -> ConnectionRecord:
    base = {
        "reporter": "source",
        "source_addr": "10.244.1.2:40000",
        "destination_addr": "10.244.2.2:8080",
        "source_workload": A,
        "source_identity": SpiffeId("cluster.local", "web", "a-sa"),
        "destination_workload": B,
        "destination_identity": SpiffeId("cluster.local", "prod", "b-sa"),
        "destination_service": SVC,
        "mtls": True,
    }
    return ConnectionRecord(**{**base, **changes})


def test_a_connection_is_counted_in_istio_shape_and_logged_once():
    lines: list[str] = []
    telemetry = Telemetry(ProxyMetrics(), AccessLog(lines.append))
    rec = record()
    telemetry.opened(rec)
    telemetry.closed(rec, up=100, down=2500, error=None)
    m = telemetry.metrics
    assert m.value(OPENED, reporter="source") == 1
    assert m.value(CLOSED, destination_service="prod/b") == 1
    assert m.value(RECEIVED) == 100
    assert m.value(SENT) == 2500
    text = m.render()
    assert (
        'istio_tcp_connections_opened_total{reporter="source",source_workload="a",'
        'source_workload_namespace="web",source_principal="spiffe://cluster.local/ns/web/sa/a-sa",'
        'destination_workload="b",destination_workload_namespace="prod",'
        'destination_principal="spiffe://cluster.local/ns/prod/sa/b-sa",'
        'destination_service="prod/b",request_protocol="tcp",'
        'connection_security_policy="mutual_tls"} 1'
    ) in text
    assert "# TYPE istio_tcp_sent_bytes_total counter" in text
    (line,) = lines
    entry = json.loads(line)
    assert entry["src"]["identity"] == "spiffe://cluster.local/ns/web/sa/a-sa"
    assert (entry["bytes_received"], entry["bytes_sent"], entry["outcome"]) == (100, 2500, "ok")


def test_unknown_peers_are_labelled_unknown_and_plaintext_none():
    telemetry = Telemetry(ProxyMetrics(), AccessLog(lambda _: None))
    telemetry.failed(
        record(source_workload=None, source_identity=None, mtls=False), "denied", "no-allow-match"
    )
    assert (
        telemetry.metrics.value(
            FAILED, source_principal="unknown", connection_security_policy="none"
        )
        == 1
    )


def test_label_values_are_escaped():
    metrics = ProxyMetrics()
    metrics.refused("tunnel", 'odd"reason\\')
    assert 'reason="odd\\"reason\\\\"' in metrics.render()


def test_metrics_endpoint_serves_prometheus_text_and_readiness():
    metrics = ProxyMetrics()
    metrics.refused("tunnel", "tls_http_request")
    ready = [False]

    async def get(port: int, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        reply = await reader.read()
        writer.close()
        return reply

    async def main():
        server = MetricsServer(metrics.render, lambda: ready[0])
        port = await server.start("127.0.0.1", 0)
        try:
            reply = await get(port, "/metrics")
            assert reply.startswith(b"HTTP/1.0 200")
            assert (
                b'weir_proxy_refused_total{listener="tunnel",reason="tls_http_request"} 1' in reply
            )
            assert (await get(port, "/healthz/ready")).startswith(b"HTTP/1.0 503")
            ready[0] = True
            assert (await get(port, "/healthz/ready")).startswith(b"HTTP/1.0 200")
            assert (await get(port, "/nope")).startswith(b"HTTP/1.0 404")
            # A request head past the limit is dropped without a reply.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /" + b"x" * 20000)
            assert await reader.read() == b""
            writer.close()
        finally:
            await server.close()

    uvloop.run(asyncio.wait_for(main(), 10))


def test_access_log_line_is_the_json_of_the_entry_for_any_text():
    """Put together by hand for speed: it must parse to exactly what json.dumps would write."""
    lines: list[str] = []
    log = AccessLog(lines.append)
    odd = 'quote " backslash \\ newline \n tab \t nul \x00 é ☃ \U0001f600'
    rec = record(source_addr=odd, source_identity=None, destination_service=None, started=1e9 + 0.5)
    log.record(rec, sent=7, received=0, outcome="error", reason=odd)
    log.record(record(started=1e9 + 1.25), sent=0, received=3, outcome="ok", reason=None)
    first, second = (json.loads(line) for line in lines)
    assert first["start_time"] == "2001-09-09T01:46:40Z"
    assert second["start_time"] == "2001-09-09T01:46:41Z"
    assert isinstance(first.pop("duration_ms"), float)
    assert first == {
        "start_time": "2001-09-09T01:46:40Z",
        "reporter": "source",
        "src": {"addr": odd, "workload": "web/a", "identity": None},
        "dst": {
            "addr": "10.244.2.2:8080",
            "workload": "prod/b",
            "identity": "spiffe://cluster.local/ns/prod/sa/b-sa",
            "service": None,
        },
        "security_policy": "mutual_tls",
        "bytes_sent": 7,
        "bytes_received": 0,
        "outcome": "error",
        "reason": odd,
    }
    assert second["reason"] is None and second["src"]["identity"].endswith("/sa/a-sa")
    assert all(line.isascii() and "\n" not in line for line in lines)


def test_duration_is_milliseconds_to_the_microsecond_and_never_negative():
    lines: list[str] = []
    log = AccessLog(lines.append)
    log.record(record(started=time.time() - 1.2345), sent=0, received=0, outcome="ok", reason=None)
    log.record(record(started=time.time() + 60), sent=0, received=0, outcome="ok", reason=None)
    took, ahead = (json.loads(line)["duration_ms"] for line in lines)
    assert 1234.5 <= took < 1334.5
    assert lines[0].split('"duration_ms":')[1].split(",")[0].count(".") == 1
    assert ahead == 0.0  # the wall clock stepped back: no negative duration
