"""weir_common.retry: delays grow exponentially up to the cap, jittered within each step."""

from __future__ import annotations

from weir_common.retry import Backoff


def test_delay_doubles_per_failure_within_the_upper_half_of_each_step():
    backoff = Backoff(initial=1.0, maximum=30.0)
    for failures, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (4, 16.0)]:
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


def test_delay_stays_at_the_cap_however_many_failures():
    backoff = Backoff(initial=0.05, maximum=2.0)
    assert all(1.0 <= backoff.delay(n) <= 2.0 for n in (6, 40, 10_000))
