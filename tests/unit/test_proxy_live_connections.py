"""The proxy's live connection list (the `connections` admin section): open until closed."""

from __future__ import annotations

from dataclasses import dataclass

from node_agent.proxy.telemetry import AccessLog, ProxyMetrics, Telemetry
from tests.unit.test_proxy_telemetry import record


@dataclass
class Counts:
    up: int = 0
    down: int = 0


def test_a_connection_is_listed_live_with_its_bytes_until_it_closes():
    telemetry = Telemetry(ProxyMetrics(), AccessLog(lambda _line: None))
    outbound, inbound = record(), record(reporter="destination", destination_service=None)
    out_counts, in_counts = Counts(), Counts()
    telemetry.opened(outbound, out_counts)
    telemetry.opened(inbound, in_counts)
    out_counts.up, out_counts.down = 10, 2500

    live = telemetry.live()
    assert [c["direction"] for c in live] == ["outbound", "inbound"]
    first = live[0]
    assert first["src"] == {
        "addr": "10.244.1.2:40000",
        "workload": "web/a",
        "identity": "spiffe://cluster.local/ns/web/sa/a-sa",
    }
    assert first["dst"]["identity"] == "spiffe://cluster.local/ns/prod/sa/b-sa"
    assert first["dst"]["service"] == "prod/b"
    assert (first["bytes_up"], first["bytes_down"]) == (10, 2500)
    assert first["security_policy"] == "mutual_tls"
    assert first["age_seconds"] >= 0
    assert live[1]["dst"]["service"] is None

    telemetry.closed(outbound, up=10, down=2500, error=None)
    assert [c["direction"] for c in telemetry.live()] == ["inbound"]
    telemetry.closed(inbound, up=0, down=0, error="reset")
    assert telemetry.live() == []


def test_a_connection_that_never_opened_is_never_listed():
    telemetry = Telemetry(ProxyMetrics(), AccessLog(lambda _line: None))
    telemetry.failed(record(), "denied", "deny:prod/x")
    assert telemetry.live() == []
