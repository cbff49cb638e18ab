"""Fuzz targets: say in the header which budget this run has (see fuzzing.py)."""

from __future__ import annotations

import pytest

from tests.fuzz.fuzzing import LONG_RUN


def pytest_report_header(config: pytest.Config) -> str:
    if LONG_RUN:
        return "fuzz: long run (WEIR_FUZZ_EXAMPLES), random seeds, no per-file timeout"
    return "fuzz: fixed budget and seed (set WEIR_FUZZ_EXAMPLES=N for a longer run)"
