"""The control plane's Prometheus metrics, rendered in the text format.

Every metric is declared once in METRICS with its help text. Label values are
fixed, short strings chosen by the code (type URLs, refusal reasons), never
caller-supplied text, so cardinality stays bounded.
"""

import bisect
import threading
from collections import defaultdict
from typing import Final, Literal

from weir_common import prometheus

Kind = Literal["counter", "gauge", "histogram"]

CONNECTED_NODES: Final = "weir_controlplane_connected_nodes"
PUSHES: Final = "weir_controlplane_xds_pushes_total"
PUSH_LATENCY: Final = "weir_controlplane_xds_push_latency_seconds"
NACKS: Final = "weir_controlplane_xds_nacks_total"
CERTS_SIGNED: Final = "weir_controlplane_certificates_signed_total"
CERTS_REFUSED: Final = "weir_controlplane_certificates_refused_total"
REGISTRATIONS: Final = "weir_controlplane_registrations_total"
REGISTRATIONS_REFUSED: Final = "weir_controlplane_registrations_refused_total"
CONFIG_REJECTED: Final = "weir_controlplane_config_rejected_total"
SNAPSHOT_GENERATION: Final = "weir_controlplane_snapshot_generation"
K8S_RELISTS: Final = "weir_controlplane_kubernetes_relists_total"
K8S_WATCH_ERRORS: Final = "weir_controlplane_kubernetes_watch_errors_total"
K8S_INVALID_OBJECTS: Final = "weir_controlplane_kubernetes_invalid_objects"
NODE_AUTH_REFUSED: Final = "weir_controlplane_node_authentications_refused_total"

METRICS: Final[dict[str, tuple[Kind, str]]] = {
    CONNECTED_NODES: ("gauge", "xDS streams open, one per connected node agent"),
    PUSHES: ("counter", "delta xDS responses sent, by type URL"),
    PUSH_LATENCY: ("histogram", "time from a config change to its push to one node"),
    NACKS: ("counter", "pushes a node rejected (it kept its previous config), by type URL"),
    CERTS_SIGNED: ("counter", "workload certificates issued"),
    CERTS_REFUSED: ("counter", "certificate requests refused, by reason"),
    REGISTRATIONS: ("counter", "workload registrations and removals accepted, by operation"),
    REGISTRATIONS_REFUSED: ("counter", "workload registrations refused, by reason"),
    CONFIG_REJECTED: ("counter", "config file contents rejected (last good config kept)"),
    SNAPSHOT_GENERATION: ("gauge", "generation of the snapshot being served"),
    K8S_RELISTS: ("counter", "lists started again after 410 Gone, by resource"),
    K8S_WATCH_ERRORS: ("counter", "failed Kubernetes lists and watches (retried), by resource"),
    K8S_INVALID_OBJECTS: ("gauge", "invalid custom resources being ignored, by kind"),
    NODE_AUTH_REFUSED: ("counter", "node tokens refused (TokenReview mode), by reason"),
}
LATENCY_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = prometheus.Labels


class Metrics:
    """Thread-safe: gRPC handlers update, the HTTP endpoint renders."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, tuple[list[int], list[float]]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            counts, total = self._histograms.setdefault(
                name, ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
            )
            counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
            total[0] += value

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in METRICS.items():
                lines += prometheus.header(name, kind, help_text)
                if kind == "histogram":
                    lines += self._render_histogram(name)
                    continue
                series = self._values.get(name) or {(): 0.0}
                lines += [prometheus.sample(name, k, v) for k, v in sorted(series.items())]
        return "\n".join(lines) + "\n"

    def _render_histogram(self, name: str) -> list[str]:
        counts, total = self._histograms.get(name, ([0] * (len(LATENCY_BUCKETS) + 1), [0.0]))
        lines, cumulative = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{name}_sum {total[0]:g}", f"{name}_count {cumulative}"]
        return lines
