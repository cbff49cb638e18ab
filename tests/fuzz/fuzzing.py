"""What every fuzz target shares: its budget, its seed corpus, and mutations of the seeds.

The budget is small and fixed by default so `make test` stays reproducible and
quick: every target's examples are derived from a fixed seed (`derandomize`)
and nothing is written to an example database inside the checkout.
`WEIR_FUZZ_EXAMPLES=N` gives every target N examples instead, drawn at random
(hypothesis prints the seed of a failure, so it can be replayed), and lifts
the per-file time bound, which then only the per-example deadline replaces.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

CORPUS: Final = Path(__file__).parent / "corpus"
_OVERRIDE: Final = os.environ.get("WEIR_FUZZ_EXAMPLES", "")
LONG_RUN: Final = bool(_OVERRIDE)
# No single input may take longer than this to be accepted or refused. Generous, since
# `make test` shares two cores with kernel tests; a hang or a blow-up is far beyond it.
DEADLINE: Final = timedelta(seconds=2)
# A whole fuzz file in `make test`; a long run is bounded by its example count.
FILE_TIMEOUT_S: Final = 0 if LONG_RUN else 60


def file_timeout() -> pytest.MarkDecorator:
    """The pytest-timeout bound for one fuzz file (0: none, for long runs)."""
    return pytest.mark.timeout(FILE_TIMEOUT_S)


def budget(examples: int, *, deadline: timedelta | None = DEADLINE) -> settings:
    """Settings for one target: `examples` in `make test`, WEIR_FUZZ_EXAMPLES when set.

    `deadline=None` is for targets that run a process per example, bounded by its timeout.
    """
    if LONG_RUN:
        if not _OVERRIDE.isdigit() or int(_OVERRIDE) < 1:
            raise ValueError(f"WEIR_FUZZ_EXAMPLES={_OVERRIDE!r} is not a positive integer")
        examples = int(_OVERRIDE)
    return settings(
        max_examples=examples,
        deadline=deadline,
        derandomize=not LONG_RUN,
        database=None,
        # Shrinking a failure can take minutes; the failing example is what matters.
        phases=(Phase.explicit, Phase.generate, Phase.shrink)
        if LONG_RUN
        else (Phase.explicit, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# Inputs that once crashed a target; each is also replayed on its own, every run.
REGRESSION_PREFIX: Final = "regression-"


def _files(target: str, *, regression: bool) -> list[Path]:
    folder = CORPUS / target
    found = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.startswith(REGRESSION_PREFIX) == regression
    ]
    if not found and not regression:
        raise FileNotFoundError(f"no seed corpus in {folder}")
    return found


# Seeds that are hostile on purpose (nesting, huge numbers): mutated, never parsed as valid.
HOSTILE_PREFIX: Final = "hostile-"


def seeds(target: str, *, valid_only: bool = False) -> list[bytes]:
    """The seed inputs kept in tests/fuzz/corpus/<target>/, in name order."""
    return [
        p.read_bytes()
        for p in _files(target, regression=False)
        if not (valid_only and p.name.startswith(HOSTILE_PREFIX))
    ]


def regressions(target: str) -> list[Any]:
    """pytest params of the inputs that once crashed `target` (regression-* in its corpus)."""
    return [pytest.param(p.read_bytes(), id=p.name) for p in _files(target, regression=True)]


def json_seeds(target: str) -> list[Any]:
    """The seeds that are JSON documents (*.json), decoded: what structured mutations start from."""
    return [
        json.loads(p.read_bytes())
        for p in _files(target, regression=False)
        if p.suffix == ".json" and not p.name.startswith(HOSTILE_PREFIX)
    ]


# -- byte-level mutations -----------------------------------------------------


@st.composite
def _mutate_once(draw: st.DrawFn, data: bytes, others: tuple[bytes, ...]) -> bytes:
    size = len(data)
    pos = draw(st.integers(0, size))
    kind = draw(st.sampled_from(("flip", "insert", "delete", "truncate", "splice", "repeat")))
    if kind == "flip" and size:
        at = min(pos, size - 1)
        bit = 1 << draw(st.integers(0, 7))
        return data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:]
    if kind == "delete":
        end = draw(st.integers(pos, min(size, pos + 64)))
        return data[:pos] + data[end:]
    if kind == "truncate":
        return data[:pos]
    if kind == "splice" and others:
        other = draw(st.sampled_from(others))
        cut = draw(st.integers(0, len(other)))
        return data[:pos] + other[cut:]
    if kind == "repeat" and size:
        end = draw(st.integers(pos, min(size, pos + 32)))
        return data[:pos] + data[pos:end] * draw(st.integers(2, 50)) + data[end:]
    return data


@st.composite
def _mutated(draw: st.DrawFn, corpus: tuple[bytes, ...], max_ops: int) -> bytes:
    data = draw(st.sampled_from(corpus))
    for _ in range(draw(st.integers(1, max_ops))):
        data = draw(_mutate_once(data, corpus))
    return data


def mutated_bytes(corpus: list[bytes], *, max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """A seed with 1..max_ops byte flips, insertions, deletions, truncations, splices."""
    return _mutated(tuple(corpus), max_ops)


def inputs(corpus: list[bytes], *, max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """What a byte-level target is fed: seeds as they are, mutated, or plain random bytes."""
    return st.one_of(
        st.sampled_from(corpus),
        mutated_bytes(corpus, max_ops=max_ops),
        st.binary(max_size=512),
    )


# -- structure-aware mutations --------------------------------------------------

_SCALARS: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(("", "add", "del", "10.0.0.1/24", "::1", "a" * 300, "\x00", "1.1.0")),
)

JSON_VALUES: Final = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every place in a JSON document a value could be swapped in (the root excluded)."""
    found: list[tuple[str | int, ...]] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.append((*prefix, key))
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found.append((*prefix, i))
            found.extend(_paths(value, (*prefix, i)))
    return found


def _replaced(doc: Any, path: tuple[str | int, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        copy: Any = dict(doc)
    else:
        copy = list(doc)
    if rest:
        copy[head] = _replaced(copy[head], rest, value, delete)
    elif delete:
        del copy[head]
    else:
        copy[head] = value
    return copy


@st.composite
def _json_mutation(draw: st.DrawFn, corpus: tuple[Any, ...], max_ops: int) -> Any:
    doc = draw(st.sampled_from(corpus))
    for _ in range(draw(st.integers(1, max_ops))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(("replace", "delete", "add")))
        if action == "add":
            key = draw(st.text(max_size=12))
            parent = _get(doc, path[:-1])
            if isinstance(parent, dict):
                doc = _replaced(doc, (*path[:-1], key), draw(JSON_VALUES), False)
            continue
        doc = _replaced(doc, path, draw(JSON_VALUES), action == "delete")
    return doc


def _get(doc: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def mutated_json(corpus: list[Any], *, max_ops: int = 3) -> st.SearchStrategy[Any]:
    """A seed document with fields replaced by arbitrary JSON values, deleted or added."""
    return _json_mutation(tuple(corpus), max_ops)
