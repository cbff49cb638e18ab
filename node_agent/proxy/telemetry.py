"""What operators see of each connection: istio_tcp_* metrics and a JSON access log.

Metric names and labels follow Istio's standard TCP metrics, so existing
dashboards work: `reporter` is "source" on the outbound proxy and
"destination" on the inbound one; `connection_security_policy` is
"mutual_tls" for HBONE and "none" for plaintext. Label values come from the
mesh snapshot and verified certificates, never from what a client sent, so
cardinality is bounded by the mesh itself. Bad input that never became a
connection (failed handshakes, malformed requests) is counted in
weir_proxy_refused_total by listener and reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

from mypy_extensions import mypyc_attr

from node_agent.proxy.access_log_writer import AccessLogWriter
from node_agent.proxy.model import Service, Workload
from weir_common import http_endpoint, prometheus
from weir_common.mesh import SpiffeId

log = logging.getLogger(__name__)

OPENED: Final = "istio_tcp_connections_opened_total"
CLOSED: Final = "istio_tcp_connections_closed_total"
FAILED: Final = "istio_tcp_connections_failed_total"
SENT: Final = "istio_tcp_sent_bytes_total"
RECEIVED: Final = "istio_tcp_received_bytes_total"
REFUSED: Final = "weir_proxy_refused_total"
RENEWALS: Final = "weir_proxy_certificate_renewals_total"
RENEWAL_FAILURES: Final = "weir_proxy_certificate_renewal_failures_total"
ACCESS_LOG_DROPPED: Final = "weir_proxy_access_log_dropped_total"
SILENT_PEERS: Final = "weir_proxy_hbone_silent_peers_total"
HELP: Final = {
    OPENED: "TCP connections opened",
    CLOSED: "TCP connections closed",
    FAILED: "TCP connections that failed (refused by policy, upstream unreachable, reset)",
    SENT: "bytes sent back to the client (response direction)",
    RECEIVED: "bytes received from the client (request direction)",
    REFUSED: "inbound input refused before it became a connection, by listener and reason",
    RENEWALS: "workload certificates renewed before they expired",
    RENEWAL_FAILURES: "attempts to renew a workload certificate that failed (each is retried)",
    SILENT_PEERS: "HBONE connections aborted because the peer answered no PING in time, "
    "by direction (outbound: we dialed it)",
}
# Counted where they happen, read when rendered.
OBSERVED_HELP: Final = {
    ACCESS_LOG_DROPPED: "access log lines dropped: its reader fell behind, or writing failed",
}
UNKNOWN: Final = "unknown"

Labels = prometheus.Labels
# Every counter of a proxy as it stands: name -> labels -> value. How one
# worker's counters reach the first worker, which serves them all summed.
MetricValues = dict[str, dict[Labels, float]]


class ConnectionRecord:
    """One proxied TCP connection, from either proxy's point of view.

    A class with its own __init__, not a dataclass: compiled, a dataclass
    keeps the __init__ the dataclasses module writes in Python, and each
    connection makes one of these.
    """

    def __init__(
        self,
        reporter: str,  # "source" (outbound) or "destination" (inbound)
        source_addr: str,
        destination_addr: str,
        *,
        source_workload: Workload | None = None,
        source_identity: SpiffeId | None = None,
        destination_workload: Workload | None = None,
        destination_identity: SpiffeId | None = None,
        destination_service: Service | None = None,
        mtls: bool = False,
        started: float | None = None,
    ) -> None:
        self.reporter = reporter
        self.source_addr = source_addr
        self.destination_addr = destination_addr
        self.source_workload = source_workload
        self.source_identity = source_identity
        self.destination_workload = destination_workload
        self.destination_identity = destination_identity
        self.destination_service = destination_service
        self.mtls = mtls
        self.started = time.time() if started is None else started

    def labels(self) -> Labels:
        src, dst = self.source_workload, self.destination_workload
        service = self.destination_service
        return (
            ("reporter", self.reporter),
            ("source_workload", src.name if src else UNKNOWN),
            ("source_workload_namespace", src.namespace if src else UNKNOWN),
            ("source_principal", str(self.source_identity) if self.source_identity else UNKNOWN),
            ("destination_workload", dst.name if dst else UNKNOWN),
            ("destination_workload_namespace", dst.namespace if dst else UNKNOWN),
            (
                "destination_principal",
                str(self.destination_identity) if self.destination_identity else UNKNOWN,
            ),
            ("destination_service", service.key if service else UNKNOWN),
            ("request_protocol", "tcp"),
            ("connection_security_policy", "mutual_tls" if self.mtls else "none"),
        )


class ConnectionCounts:
    """The istio_tcp_* counters of one label set, added to in place: a connection
    finds them once, when it opens (a lookup hashes all ten labels)."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.failed = 0
        self.received = 0
        self.sent = 0


class ProxyMetrics:
    """Counters, updated on the event loop, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = {name: {} for name in HELP}
        self._connections: dict[Labels, ConnectionCounts] = {}
        self._observed: dict[str, Callable[[], float]] = {}

    def observe(self, name: str, read: Callable[[], float]) -> None:
        """Render `name` (one of OBSERVED_HELP) as the counter `read` returns."""
        self._observed[name] = read

    def inc(self, name: str, labels: Labels, amount: float = 1.0) -> None:
        series = self._values[name]
        series[labels] = series.get(labels, 0.0) + amount

    def connections(self, labels: Labels) -> ConnectionCounts:
        """The connection counters of `labels`, to add to (rendered as OPENED, CLOSED, ...)."""
        counts = self._connections.get(labels)
        if counts is None:
            counts = self._connections[labels] = ConnectionCounts()
        return counts

    def value(self, name: str, **labels: str) -> float:
        """Sum of every series of `name` whose labels include `labels` (for tests, status)."""
        return sum(
            v
            for key, v in self.values().get(name, {}).items()
            if all(dict(key).get(k) == want for k, want in labels.items())
        )

    def values(self) -> MetricValues:
        """Every counter as it stands now (the observed ones read now)."""
        current = {name: dict(series) for name, series in self._values.items()}
        for labels, counts in self._connections.items():
            # A series appears once something counted in it, as with inc().
            if counts.opened:
                current[OPENED][labels] = float(counts.opened)
            if counts.failed:
                current[FAILED][labels] = float(counts.failed)
            if counts.closed:
                current[CLOSED][labels] = float(counts.closed)
                current[RECEIVED][labels] = float(counts.received)
                current[SENT][labels] = float(counts.sent)
        for name, read in self._observed.items():
            current[name] = {(): float(read())}
        return current

    def traffic(self, others: Sequence[MetricValues] = ()) -> list[dict[str, Any]]:
        """Connections opened and failed so far, per reporter, pair of workloads and security;
        `others`: the other workers' counters, counted in."""
        values = summed(self.values(), *others)
        rows: dict[Labels, dict[str, Any]] = {}
        for name, field_name in ((OPENED, "opened"), (FAILED, "failed")):
            for labels, value in values.get(name, {}).items():
                row = rows.setdefault(labels, {**dict(labels), "opened": 0, "failed": 0})
                row[field_name] += int(value)
        return [rows[key] for key in sorted(rows)]

    def refused(self, listener: str, reason: str) -> None:
        self.inc(REFUSED, (("listener", listener), ("reason", reason)))

    def silent_peer(self, direction: str) -> None:
        self.inc(SILENT_PEERS, (("direction", direction),))

    def render(self, others: Sequence[MetricValues] = ()) -> str:
        """The Prometheus text of these counters, plus `others` (the other workers')."""
        return render(summed(self.values(), *others))


def summed(*values: MetricValues) -> MetricValues:
    """Counters of several workers added up, series by series."""
    total: MetricValues = {}
    for each in values:
        for name, series in each.items():
            into = total.setdefault(name, {})
            for labels, value in series.items():
                into[labels] = into.get(labels, 0.0) + value
    return total


def render(values: MetricValues) -> str:
    """Prometheus text, counters in HELP's order, then the observed ones."""
    lines: list[str] = []
    for name, help_text in (*HELP.items(), *OBSERVED_HELP.items()):
        if name not in values:
            continue
        lines += prometheus.header(name, "counter", help_text)
        lines += [
            prometheus.sample(name, labels, value) for labels, value in sorted(values[name].items())
        ]
    return "\n".join(lines) + "\n"


def values_to_json(values: MetricValues) -> list[list[Any]]:
    """[[name, [[label, value], ...], value], ...]: what JSON can carry of MetricValues."""
    return [
        [name, [list(pair) for pair in labels], value]
        for name, series in values.items()
        for labels, value in series.items()
    ]


def values_from_json(data: object) -> MetricValues:
    """The inverse of values_to_json; TypeError or ValueError for anything else
    (names we do not serve too)."""
    if not isinstance(data, list):
        raise TypeError("counters are not a list")
    values: MetricValues = {}
    for row in data:
        if not (isinstance(row, list) and len(row) == 3):
            raise ValueError(f"counter {row!r} is not [name, labels, value]")
        name, labels, value = row
        if name not in HELP and name not in OBSERVED_HELP:
            raise ValueError(f"no counter {name!r}")
        if not (
            isinstance(labels, list)
            and all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                for p in labels
            )
        ):
            raise ValueError(f"counter {name} has labels that are not [name, value] pairs")
        # type(), not isinstance: JSON true is a bool, and True == 1.
        if type(value) not in (int, float):
            raise ValueError(f"counter {name} has a value that is not a number")
        values.setdefault(name, {})[tuple((k, v) for k, v in labels)] = float(value)
    return values


# Tests record the lines with a subclass of their own (testbed/proxy_fakes.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class AccessLog:
    """One JSON line per connection, written when it ends.

    The line is joined from pieces rather than made by json.dumps on a dict of
    dicts (5-7 % of the proxy's CPU per connection), an f-string (compiled,
    three times the join's cost) or a %-format (perf: most of the line's
    cost, parsing the format and printing a float). Strings go through json's
    own escaping, so the line is the same JSON.
    """

    def __init__(self, write: Callable[[str], None] | None = None, *, fd: int = 1) -> None:
        """Lines go to `write` if given (tests), else to `fd` (stdout) off the event loop."""
        self._writer: AccessLogWriter | None = None
        if write is None:
            write = self._writer = AccessLogWriter(fd)
        self._write = write
        self._second = -1
        self._second_text = ""

    @property
    def dropped(self) -> int:
        """Lines that never reached the file (always 0 with a `write` of the caller's)."""
        return self._writer.dropped if self._writer is not None else 0

    def close(self) -> None:
        """Write out what is still queued; lines after this are dropped."""
        if self._writer is not None:
            self._writer.close()

    def record(
        self,
        record: ConnectionRecord,
        *,
        sent: int,
        received: int,
        outcome: str,
        reason: str | None,
    ) -> None:
        src, dst, service = (
            record.source_workload,
            record.destination_workload,
            record.destination_service,
        )
        src_id, dst_id = record.source_identity, record.destination_identity
        started = record.started
        # Whole microseconds, then text by table: float formatting took most
        # of the line's cost. max(): the wall clock may step back.
        elapsed_ms, micros = divmod(max(0, int((time.time() - started) * 1_000_000)), 1000)
        self._write(
            "".join(
                [
                    '{"start_time":"',
                    self._start_time(started),
                    '","duration_ms":',
                    str(elapsed_ms),
                    _THOUSANDTHS[micros],
                    ',"reporter":',
                    _text(record.reporter),
                    ',"src":{"addr":',
                    _text(record.source_addr),
                    ',"workload":',
                    _text(src.key) if src else "null",
                    ',"identity":',
                    _text(src_id.uri) if src_id else "null",
                    '},"dst":{"addr":',
                    _text(record.destination_addr),
                    ',"workload":',
                    _text(dst.key) if dst else "null",
                    ',"identity":',
                    _text(dst_id.uri) if dst_id else "null",
                    ',"service":',
                    _text(service.key) if service else "null",
                    '},"security_policy":"',
                    "mutual_tls" if record.mtls else "none",
                    '","bytes_sent":',
                    str(sent),
                    ',"bytes_received":',
                    str(received),
                    ',"outcome":',
                    _text(outcome),
                    ',"reason":',
                    _text(reason) if reason is not None else "null",
                    "}",
                ]
            )
        )

    def _start_time(self, started: float) -> str:
        second = int(started)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._second_text


# ".000" to ".999": the fraction of a millisecond in the access log's duration_ms.
_THOUSANDTHS: Final = tuple(f".{n:03d}" for n in range(1000))
# A JSON string literal, quotes included (C-accelerated, as json.dumps uses).
_text: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


class ByteCounts(Protocol):
    """Bytes carried so far each way (hbone.Flow): read live, for the admin dump."""

    up: int
    down: int


class Telemetry:
    """Metrics and access log together: what every connection reports, once.

    It also holds the connections open right now, so `weir node connections`
    answers from what the proxy carries, not from counters.
    """

    def __init__(self, metrics: ProxyMetrics, access_log: AccessLog) -> None:
        self.metrics = metrics
        self.access_log = access_log
        metrics.observe(ACCESS_LOG_DROPPED, lambda: access_log.dropped)
        # Keyed by id(): records are mutable dataclasses, hence unhashable.
        # The counters are found once, at the opening: a record is complete
        # once opened, and finding them costs as much as counting in them.
        self._live: dict[int, tuple[ConnectionRecord, ByteCounts | None, ConnectionCounts]] = {}

    def opened(self, record: ConnectionRecord, counts: ByteCounts | None = None) -> None:
        counters = self.metrics.connections(record.labels())
        counters.opened += 1
        self._live[id(record)] = (record, counts, counters)

    def live(self) -> list[dict[str, Any]]:
        """The open connections, oldest first, with both identities, bytes, age, direction."""
        now = time.time()
        out = []
        for record, counts, _ in sorted(self._live.values(), key=lambda rc: rc[0].started):
            src, dst = record.source_workload, record.destination_workload
            out.append(
                {
                    "direction": "outbound" if record.reporter == "source" else "inbound",
                    "src": {
                        "addr": record.source_addr,
                        "workload": src.key if src else None,
                        "identity": str(record.source_identity) if record.source_identity else None,
                    },
                    "dst": {
                        "addr": record.destination_addr,
                        "workload": dst.key if dst else None,
                        "identity": (
                            str(record.destination_identity)
                            if record.destination_identity
                            else None
                        ),
                        "service": (
                            record.destination_service.key if record.destination_service else None
                        ),
                    },
                    "security_policy": "mutual_tls" if record.mtls else "none",
                    "bytes_up": counts.up if counts else 0,
                    "bytes_down": counts.down if counts else 0,
                    "age_seconds": round(now - record.started, 3),
                }
            )
        return out

    def closed(self, record: ConnectionRecord, *, up: int, down: int, error: str | None) -> None:
        live = self._live.pop(id(record), None)
        counters = live[2] if live is not None else self.metrics.connections(record.labels())
        counters.closed += 1
        counters.received += up
        counters.sent += down
        outcome = "ok" if error is None else "error"
        self.access_log.record(record, sent=down, received=up, outcome=outcome, reason=error)

    def failed(self, record: ConnectionRecord, outcome: str, reason: str) -> None:
        """Never got through: denied, refused, upstream unreachable."""
        self.metrics.connections(record.labels()).failed += 1
        self.access_log.record(record, sent=0, received=0, outcome=outcome, reason=reason)


class MetricsServer(http_endpoint.HttpEndpoint):
    """GET /metrics (Prometheus) and /healthz/ready, one request per connection."""

    def __init__(
        self, render: Callable[[], str | Awaitable[str]], ready: Callable[[], bool]
    ) -> None:
        super().__init__(
            {
                "/metrics": http_endpoint.prometheus(render),
                "/healthz/ready": http_endpoint.readiness(ready),
            }
        )
