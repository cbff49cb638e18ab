"""The capture benchmark's C programs, measured for real in each capture mode.

Builds capture_client and capture_standin, brings up the benchmark's own
topology (client and server pods, eBPF programs installed, echo server and
stand-in proxy running) and runs a short measurement per mode, as
bench/capture_modes.py does. In the captured modes every connection the
client made must have come through the stand-in (it recovered the original
destination and relayed); with no capture none may. Afterwards nothing of
the topology or the eBPF pins may be left.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.capture_modes import (
    MODES,
    Cpus,
    Settings,
    bench_pods,
    build_programs,
    measure,
    run_mode,
)
from node_agent.constants import OUTBOUND_CAPTURE_PORT

pytestmark = pytest.mark.netns

SETTINGS = Settings(connects=300, seconds=0.3)
# Echoes larger than the stand-in's 16 KiB relay buffer, 8 at a time: partial
# reads and writes, and a FIN passed on only after the bytes ahead of it.
BULK = Settings(connects=100, seconds=0.2, size=60000, concurrency=8)
UNPINNED = Cpus(None, None, None)


def test_each_mode_measured_and_captured_connections_go_through_the_standin(
    leftovers: Callable[[str], list[str]],
) -> None:
    programs = build_programs()
    samples: dict[str, dict[str, float]] = {}
    bulk: dict[str, dict[str, float]] = {}
    with bench_pods(programs, UNPINNED) as bench:
        prefix, pins = bench.prefix, bench.pins
        for mode in MODES:
            samples[mode] = run_mode(mode, programs, bench, SETTINGS, UNPINNED)
        for mode in ("iptables", "ebpf"):
            bulk[mode] = run_mode(mode, programs, bench, BULK, UNPINNED)
        # The client's last close is still being relayed when it exits.
        settled = bench.standin.settled()
        final = bench.standin.stop()

    for mode, s in samples.items():
        assert s["failures"] == 0, (mode, s)
        # The latency phase alone made SETTINGS.connects connections.
        assert s["connections"] > SETTINGS.connects, (mode, s)
        assert 0 < s["connect_p50_us"] <= s["connect_rr_p50_us"] <= s["connect_rr_p99_us"], s
        assert s["conn_per_s"] > 0 and s["rr_per_s"] > 0, (mode, s)
    assert samples["none"]["standin_accepted"] == 0
    for mode in ("iptables", "ebpf"):
        assert samples[mode]["standin_accepted"] == samples[mode]["connections"], samples[mode]
        assert bulk[mode]["failures"] == 0, (mode, bulk[mode])
        assert bulk[mode]["standin_accepted"] == bulk[mode]["connections"] > BULK.connects

    # SIGTERM's report: every connection accepted was relayed and ended cleanly.
    captured = sum(s[m]["connections"] for s in (samples, bulk) for m in ("iptables", "ebpf"))
    assert final == settled
    assert final == {
        "accepted": captured,
        "completed": captured,
        "original_dst_failures": 0,
        "upstream_failures": 0,
        "reset": 0,
        "open": 0,
    }
    assert leftovers(prefix) == []
    assert not pins.root.exists()


def test_standin_refuses_a_connection_nothing_redirected() -> None:
    """Without capture there is no original destination: counted, closed, the client fails."""
    programs = build_programs()
    with bench_pods(programs, UNPINNED) as bench:
        # Straight to the stand-in's own port from inside its pod: nothing redirected it.
        doc = measure(
            programs.client,
            bench.client,
            "127.0.0.1",
            Settings(connects=20, seconds=0),
            None,
            port=OUTBOUND_CAPTURE_PORT,
        )
        counters = bench.standin.counters()
    assert doc["latency"]["failures"] == 20
    assert doc["latency"]["connect_rr_us"]["p50"] is None
    assert counters["accepted"] == counters["original_dst_failures"] == 20
    assert counters["upstream_failures"] == counters["completed"] == counters["open"] == 0
