"""The soak's verdict: growth after warm-up is judged on window medians."""

from __future__ import annotations

from bench.soak import Verdict, flatness


def _series(
    component: str, measure: str, values: list[float]
) -> list[tuple[float, str, str, float]]:
    return [(10.0 * i, component, measure, v) for i, v in enumerate(values)]


def test_warm_up_is_ignored_and_window_medians_are_compared() -> None:
    # 0-50 s warm-up (growing), then flat with one spike per window.
    values = [10.0, 20, 40, 60, 80, 100, 100, 300, 100, 100, 100, 100, 100, 300, 101]
    (verdict,) = flatness(_series("proxy n1", "rss_mib", values), warm_up_s=50, window_s=50)
    assert (verdict.first, verdict.last, verdict.peak) == (100, 100, 300)
    assert not verdict.grew(0.05)


def test_steady_growth_is_caught() -> None:
    values = [100.0 + 2 * i for i in range(20)]
    (verdict,) = flatness(_series("agent n1", "rss_mib", values), warm_up_s=50, window_s=50)
    assert verdict.change > 0.05
    assert verdict.grew(0.05)


def test_one_descriptor_more_is_not_a_leak_but_two_are() -> None:
    assert not Verdict("agent", "fds", 18, 19, 19).grew(0.05)
    assert Verdict("agent", "fds", 18, 20, 20).grew(0.05)
    assert Verdict("agent", "rss_mib", 18, 19, 19).grew(0.05)


def test_a_run_too_short_for_two_windows_gives_no_verdict() -> None:
    assert flatness(_series("cp", "fds", [1.0, 2, 3, 4]), warm_up_s=20, window_s=50) == []
