"""The Prometheus text exposition format, shared by the proxy and the control plane."""

from __future__ import annotations

import math
from collections.abc import Sequence

Labels = tuple[tuple[str, str], ...]


def header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def sample(name: str, labels: Labels | Sequence[tuple[str, str]], value: float) -> str:
    """One line: `name{k="v",...} value`, label values escaped as the format requires."""
    if not labels:
        return f"{name} {_number(value)}"
    text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels)
    return f"{name}{{{text}}} {_number(value)}"


def _number(value: float) -> str:
    # Exact for whole numbers of any size (byte counters pass 1e6 quickly, and
    # `:g` would round them to 6 digits); shortest round-trip text otherwise.
    if math.isfinite(value) and value == int(value) and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value)).replace("inf", "Inf").replace("nan", "NaN")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
