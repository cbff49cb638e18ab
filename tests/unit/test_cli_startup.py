"""`weir` loads only the subcommand it runs: start-up stays cheap for the CNI-path commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from weir_cli import _chosen


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["redirect", "apply"], "redirect"),
        (["--log-level", "debug", "agent", "--node", "n"], "agent"),
        (["--help"], None),
        ([], None),
    ],
)
def test_the_subcommand_is_found_past_global_options(argv, expected):
    assert _chosen(argv) == expected


def test_weir_redirect_does_not_import_the_proxy_or_grpc():
    code = (
        "import sys\n"
        "from weir_cli import build_parser\n"
        "build_parser(['redirect', 'check', '--netns', 'x'])\n"
        "heavy = ('grpc', 'uvloop', 'h2', 'node_agent.proxy.cli')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
