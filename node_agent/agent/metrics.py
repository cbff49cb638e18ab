"""The node agent's metrics, in the Prometheus text format, served at /metrics on :15021.

Beside the proxy's (node_agent/proxy/telemetry.py, :15020): what the agent
does to pods and how its config stream fares. Counters and the histogram are
updated on the event loop by the Enroller (through the EnrollmentMetrics
protocol it declares); gauges and the xDS NACK counter are read when
Prometheus scrapes, from the state that answers `weir node status`, so the
two never disagree. Every label value comes from a fixed set (outcomes,
capture modes, operations, xDS resource types): cardinality does not grow
with the pods.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from typing import Final

from weir_common import prometheus

PODS_ENROLLED: Final = "weir_agent_pods_enrolled"
ENROLLMENTS: Final = "weir_agent_enrollments_total"
ENROLLMENT_SECONDS: Final = "weir_agent_enrollment_duration_seconds"
REDIRECT_ERRORS: Final = "weir_agent_redirect_errors_total"
XDS_CONNECTED: Final = "weir_agent_xds_connected"
XDS_NACKS: Final = "weir_agent_xds_nacks_total"
HELP: Final = {
    PODS_ENROLLED: "pods enrolled on this node (captured and handed to the proxy)",
    ENROLLMENTS: "CNI ADDs and pre-existing pods handled, by outcome "
    "(captured, not_in_mesh, failed)",
    ENROLLMENT_SECONDS: "time to enroll a pod, from the request to its outcome, by outcome",
    REDIRECT_ERRORS: "capture operations that failed, by capture mode and operation "
    "(apply, check, remove, prune)",
    XDS_CONNECTED: "1 while the config stream to the control plane is up, else 0",
    XDS_NACKS: "config pushes this agent rejected (NACKed), by resource type",
}
OUTCOMES: Final = ("captured", "not_in_mesh", "failed")
# Enrollment is a few proxy and netlink round trips: milliseconds when all is
# well; the upper buckets show a slow proxy or CA before the CNI bound hits.
ENROLLMENT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """One labelled histogram: cumulative buckets, sum and count per label set."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"histogram buckets must be strictly increasing: {buckets}")
        self.buckets = buckets
        # labels -> (count per bucket, the last one being +Inf; sum)
        self._series: dict[prometheus.Labels, tuple[list[int], float]] = {}

    def observe(self, labels: prometheus.Labels, value: float) -> None:
        counts, total = self._series.get(labels, ([0] * (len(self.buckets) + 1), 0.0))
        # `le` buckets are inclusive: a value equal to a bound falls in it.
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._series[labels] = (counts, total + value)

    def count(self, labels: prometheus.Labels) -> int:
        counts, _ = self._series.get(labels, ([], 0.0))
        return sum(counts)

    def render(self, name: str) -> list[str]:
        lines: list[str] = []
        for labels, (counts, total) in sorted(self._series.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, None), counts, strict=True):
                cumulative += count
                le = "+Inf" if bound is None else f"{bound:g}"
                lines.append(prometheus.sample(f"{name}_bucket", (*labels, ("le", le)), cumulative))
            lines.append(prometheus.sample(f"{name}_sum", labels, total))
            lines.append(prometheus.sample(f"{name}_count", labels, cumulative))
        return lines


class AgentMetrics:
    """What the agent counts, plus the live state it reads at each scrape.

    `pods_enrolled`, `xds_connected` and `xds_nacks` are read on the event
    loop when /metrics is served.
    """

    def __init__(
        self,
        *,
        pods_enrolled: Callable[[], int],
        xds_connected: Callable[[], bool],
        xds_nacks: Callable[[], Mapping[str, int]],
    ) -> None:
        self._pods_enrolled = pods_enrolled
        self._xds_connected = xds_connected
        self._xds_nacks = xds_nacks
        # Every outcome shows from the first scrape, so rate() has a start.
        self._enrollments: dict[prometheus.Labels, float] = {
            (("outcome", outcome),): 0.0 for outcome in OUTCOMES
        }
        self._latency = Histogram(ENROLLMENT_BUCKETS)
        self._redirect_errors: dict[prometheus.Labels, float] = {}

    def enrollment(self, outcome: str, seconds: float) -> None:
        """One enrollment finished with `outcome` (one of OUTCOMES) after `seconds`."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown enrollment outcome {outcome!r}")
        labels = (("outcome", outcome),)
        self._enrollments[labels] += 1
        self._latency.observe(labels, seconds)

    def redirect_error(self, mode: str, operation: str) -> None:
        labels = (("mode", mode), ("operation", operation))
        self._redirect_errors[labels] = self._redirect_errors.get(labels, 0.0) + 1

    def enrollments(self, outcome: str) -> float:
        return self._enrollments[(("outcome", outcome),)]

    def enrollment_latencies(self, outcome: str) -> int:
        """How many enrollments with `outcome` the histogram holds."""
        return self._latency.count((("outcome", outcome),))

    def redirect_errors(self, mode: str, operation: str) -> float:
        return self._redirect_errors.get((("mode", mode), ("operation", operation)), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        lines += prometheus.header(PODS_ENROLLED, "gauge", HELP[PODS_ENROLLED])
        lines.append(prometheus.sample(PODS_ENROLLED, (), self._pods_enrolled()))
        lines += _counter(ENROLLMENTS, self._enrollments)
        lines += prometheus.header(ENROLLMENT_SECONDS, "histogram", HELP[ENROLLMENT_SECONDS])
        lines += self._latency.render(ENROLLMENT_SECONDS)
        lines += _counter(REDIRECT_ERRORS, self._redirect_errors)
        lines += prometheus.header(XDS_CONNECTED, "gauge", HELP[XDS_CONNECTED])
        lines.append(prometheus.sample(XDS_CONNECTED, (), 1 if self._xds_connected() else 0))
        nacks: dict[prometheus.Labels, float] = {
            (("type", kind),): float(n) for kind, n in self._xds_nacks().items()
        }
        lines += _counter(XDS_NACKS, nacks)
        return "\n".join(lines) + "\n"


def _counter(name: str, series: Mapping[prometheus.Labels, float]) -> list[str]:
    lines = prometheus.header(name, "counter", HELP[name])
    lines += [prometheus.sample(name, labels, value) for labels, value in sorted(series.items())]
    return lines
