"""The proxy's per-connection modules run compiled (mypyc, setup.py), and from their source.

Python imports a compiled module ahead of the source beside it, so a source
edited after the build would not be what runs, nor what the tests test.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compiled_sources() -> list[str]:
    """setup.py's COMPILED list, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(v) for v in value]
    raise AssertionError("setup.py has no COMPILED list")


def test_the_list_names_existing_proxy_modules():
    sources = compiled_sources()
    assert sources == sorted(sources)
    assert "node_agent/proxy/hbone.py" in sources
    for source in sources:
        assert (ROOT / source).is_file(), source


@pytest.mark.parametrize("source", compiled_sources())
def test_each_module_is_imported_compiled_and_built_after_its_source(source):
    name = source.removesuffix(".py").replace("/", ".")
    module = importlib.import_module(name)
    loaded = Path(module.__file__ or "")
    assert loaded.suffix == ".so", (
        f"{name} is imported from {loaded.name}, not compiled: run make (setup.py builds it)"
    )
    assert loaded.stat().st_mtime >= (ROOT / source).stat().st_mtime, (
        f"{source} changed after {loaded.name} was built: run make to compile it again"
    )
