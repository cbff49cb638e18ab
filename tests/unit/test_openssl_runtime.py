"""Weir's OpenSSL under Python's ssl module: the venv's hook, loading by path, and its guards."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent import openssl
from weir_common import openssl_runtime

CHECKOUT = Path(__file__).resolve().parents[2]


def _bare_python(code: str) -> subprocess.CompletedProcess[str]:
    """`code` in this venv's interpreter without site.py, so no .pth hook runs first."""
    return subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(CHECKOUT)!r}); {code}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_this_venv_runs_on_weirs_openssl() -> None:
    # What `make deps` installs: the libraries and the hook that loads them first.
    assert openssl_runtime.loaded_from() == openssl_runtime.library_dir()
    assert ssl.OPENSSL_VERSION_INFO[:2] >= openssl_runtime.SHIPPED
    # node_agent.openssl's ctypes calls reach the same library the ssl module runs on.
    assert openssl.libcrypto().OpenSSL_version_num() == ssl.OPENSSL_VERSION_NUMBER


def test_loading_by_path_switches_ssl_and_hashlib() -> None:
    directory = openssl_runtime.library_dir()
    proc = _bare_python(
        "from pathlib import Path; import weir_common.openssl_runtime as r; "
        f"print(r.load(Path({str(directory)!r}))); "
        "import ssl, hashlib; print(ssl.OPENSSL_VERSION); "
        "print(hashlib.sha256(b'weir').hexdigest()[:8])"
    )
    assert proc.returncode == 0, proc.stderr
    loaded, version, digest = proc.stdout.split("\n")[:3]
    assert loaded == str(directory)
    assert version.startswith(f"OpenSSL {'.'.join(map(str, openssl_runtime.SHIPPED))}.")
    assert digest == "9e1bd4e5"


def test_too_late_once_ssl_is_loaded() -> None:
    directory = openssl_runtime.library_dir()
    proc = _bare_python(
        "import ssl; from pathlib import Path; import weir_common.openssl_runtime as r; "
        f"r.load(Path({str(directory)!r}))"
    )
    assert proc.returncode == 1
    assert "TooLateError: _ssl already loaded on the system's OpenSSL" in proc.stderr


def test_an_installation_without_the_libraries_stays_on_the_systems(tmp_path: Path) -> None:
    proc = _bare_python(
        "from pathlib import Path; import weir_common.openssl_runtime as r; "
        f"print(r.load(Path({str(tmp_path)!r}))); import ssl; print(ssl.OPENSSL_VERSION); "
        "print(r.owner())"
    )
    assert proc.returncode == 0, proc.stderr
    loaded, version, owner = proc.stdout.split("\n")[:3]
    assert loaded == "None"
    assert version.startswith("OpenSSL 3.0.")  # Debian 12's
    assert owner == "the system's"


def test_write_hook_is_one_import_line(tmp_path: Path) -> None:
    path = openssl_runtime.write_hook(tmp_path)
    assert path == tmp_path / "weir-openssl.pth"
    assert path.read_text() == openssl_runtime.HOOK_LINE
    assert openssl_runtime.HOOK_LINE.startswith("import ")  # site.py runs only such lines
    assert not (tmp_path / "weir-openssl.pth.new").exists()


@pytest.mark.parametrize(
    ("version", "weirs", "fast", "says"),
    [
        ((3, 5), True, True, "TLS on Weir's OpenSSL 3.5"),
        ((3, 6), False, True, "TLS on the system's OpenSSL 3.6"),
        ((3, 0), False, False, "TLS on the system's OpenSSL 3.0, not Weir's 3.5 (/x is missing)"),
    ],
)
def test_assess(version: tuple[int, int], weirs: bool, fast: bool, says: str) -> None:
    ok, line = openssl_runtime.assess(version, weirs=weirs, expected_dir=Path("/x"))
    assert ok is fast
    assert line.startswith(says)
