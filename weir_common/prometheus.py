"""The Prometheus text exposition format, shared by the proxy and the control plane."""

from __future__ import annotations

from collections.abc import Sequence

Labels = tuple[tuple[str, str], ...]


def header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def sample(name: str, labels: Labels | Sequence[tuple[str, str]], value: float) -> str:
    """One line: `name{k="v",...} value`, label values escaped as the format requires."""
    if not labels:
        return f"{name} {value:g}"
    text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels)
    return f"{name}{{{text}}} {value:g}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
