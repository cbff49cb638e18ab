"""The local-mode mesh YAML: a MeshConfig, or a ConfigError naming where and why.

Each input's whole parse (YAML, then the schema) is bounded in time, so a file
crafted with YAML aliases cannot hang the control plane on a reload.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from controlplane.config_file import ConfigError, parse_bytes
from controlplane.mesh import MeshConfig
from tests.fuzz.fuzzing import budget, file_timeout, inputs, mutated_json, regressions, seeds

pytestmark = file_timeout()

YAMLS = seeds("config_file")
DOCUMENTS: list[Any] = [yaml.safe_load(raw) for raw in seeds("config_file", valid_only=True)]
# YAML can say more than JSON: these make the structured mutations reach it.
YAML_VALUES = st.one_of(
    st.sampled_from(("~", "!!binary aGk=", "2026-11-30", "0x1F", "1e400", ".nan", "*undefined")),
    st.sampled_from(("? [a]\n: b", "&a [*a]", "!!python/object:os.system x", "- - - -")),
)


def _check(data: bytes) -> None:
    try:
        mesh = parse_bytes(data, source="mesh.yaml")
    except ConfigError as e:
        assert e.message.startswith("mesh.yaml: ") and e.reason
        return
    assert isinstance(mesh, MeshConfig)


@pytest.mark.parametrize("data", regressions("config_file"))
def test_regression(data: bytes) -> None:
    _check(data)


@budget(150)
@given(inputs(YAMLS, max_ops=3))
def test_mutated_yaml_is_parsed_or_refused(data: bytes) -> None:
    _check(data)


@budget(200)
@given(mutated_json(DOCUMENTS, max_ops=4))
def test_mutated_document_is_parsed_or_refused(document: Any) -> None:
    _check(yaml.safe_dump(document).encode())


@budget(100)
@given(st.sampled_from(YAMLS), st.integers(0, 4000), YAML_VALUES)
def test_yaml_fragments_spliced_in_are_parsed_or_refused(seed: bytes, at: int, value: str) -> None:
    # At a line start, after a key, or mid-token: wherever it lands, it must not crash.
    at = min(at, len(seed))
    _check(seed[:at] + value.encode() + seed[at:])
