"""Sample lines of the Prometheus text format: exact counters, escaped labels."""

import pytest

from weir_common.prometheus import sample


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3.0, "3"),
        # A byte counter past a million stays exact (`:g` printed 1.23457e+06).
        (1_234_567.0, "1234567"),
        (2.0**53, "9007199254740992"),
        (0.25, "0.25"),
        (1e-7, "1e-07"),
        (float("inf"), "Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_values_are_exact_and_in_the_formats_spelling(value: float, text: str) -> None:
    assert sample("m", (), value) == f"m {text}"


def test_label_values_are_escaped() -> None:
    line = sample("m", (("a", 'x"y\\z\nw'),), 1)
    assert line == 'm{a="x\\"y\\\\z\\nw"} 1'
