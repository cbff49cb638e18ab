"""Refusal logs: every kind seen, no kind able to flood."""

from __future__ import annotations

import logging

from weir_common.log_limit import LogLimiter


def test_one_line_per_kind_and_interval_with_the_count_left_out(caplog):
    now = [100.0]
    limiter = LogLimiter(interval_s=10, clock=lambda: now[0])
    log = logging.getLogger("test.refusals")
    with caplog.at_level(logging.INFO, logger="test.refusals"):
        for _ in range(1000):
            limiter.log(log, logging.WARNING, ("tunnel", "bad_alpn"), "refused %s", "bad_alpn")
        limiter.log(log, logging.WARNING, ("tunnel", "no_sni"), "refused %s", "no_sni")
        now[0] += 10
        limiter.log(log, logging.WARNING, ("tunnel", "bad_alpn"), "refused %s", "bad_alpn")
    assert [r.getMessage() for r in caplog.records] == [
        "refused bad_alpn",
        "refused no_sni",
        "refused bad_alpn (999 more like it in the last 10 s not logged)",
    ]


def test_a_peer_inventing_kinds_cannot_grow_memory_without_bound():
    limiter = LogLimiter(clock=lambda: 0.0)
    log = logging.getLogger("test.refusals.kinds")
    for i in range(5000):
        limiter.log(log, logging.DEBUG, ("kind", i), "x")
    assert len(limiter._kinds) <= 1024
