"""Small C programs for the benchmarks and their tests, compiled on first use.

The load generators and stand-ins in bench/native/ are C so that the harness
is never what limits a measurement. Each binary is cached under the user's
cache directory, named by a digest of its source and flags, so a changed
source is rebuilt and an unchanged one is never compiled twice.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Final

SOURCES: Final = Path(__file__).resolve().parent.parent / "bench" / "native"
CFLAGS: Final = ("-O2", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-pthread")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "weir" / "native"


def build(name: str, *, extra_flags: tuple[str, ...] = ()) -> Path:
    """The compiled `bench/native/<name>.c`, built now if this source was never built."""
    source = SOURCES / f"{name}.c"
    if not source.is_file():
        raise FileNotFoundError(f"no C source {source}")
    flags = (*CFLAGS, *extra_flags)
    digest = hashlib.sha256(source.read_bytes() + "\0".join(flags).encode()).hexdigest()[:16]
    binary = cache_dir() / f"{name}-{digest}"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: a concurrent build or an
    # interrupted one never leaves a half-written binary under that name.
    fd, partial_name = tempfile.mkstemp(prefix=f".{name}-", dir=binary.parent)
    os.close(fd)
    partial = Path(partial_name)
    try:
        result = subprocess.run(
            ["cc", *flags, "-o", str(partial), str(source), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cc failed on {source}:\n{result.stderr}")
        partial.chmod(0o700)
        partial.replace(binary)
    finally:
        partial.unlink(missing_ok=True)
    return binary
