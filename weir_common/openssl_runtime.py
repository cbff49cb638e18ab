"""Run Python's ssl module on the OpenSSL Weir ships, where the installation has one.

Debian 12's OpenSSL 3.0 encrypts AES-GCM without the VAES/AVX-512 code that
OpenSSL 3.5 has, at about half its speed where the CPU offers those
instructions; for the node proxy that is most of the gap to Envoy's bulk
throughput (docs/proxy.md, "The OpenSSL underneath"). So the venv, and the
image's, carry OpenSSL 3.5's two libraries (scripts/build-openssl.sh) in
`<prefix>/lib/weir-openssl`.

Python's `_ssl` and `_hashlib` name their libraries by soname (libssl.so.3,
libcrypto.so.3), and the dynamic linker resolves a soname to an object
already loaded under it. Loading Weir's two libraries by path before anything
imports ssl therefore makes `_ssl`, `_hashlib` and node_agent.openssl's
ctypes calls all run on them, one OpenSSL per process. OpenSSL keeps its ABI
within major version 3, which is what lets a module built against 3.0 run on
3.5. A .pth file in the venv's site-packages (HOOK_FILE) calls `load()` at
interpreter start, before any import can reach ssl.

An installation without the directory (a plain `pip install`) runs on the
system's OpenSSL; the node proxy says so in its log.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Final

# What scripts/build-openssl.sh builds; a system OpenSSL this new needs no replacing.
SHIPPED: Final = (3, 5)
LIBRARIES: Final = ("libcrypto.so.3", "libssl.so.3")  # libssl needs libcrypto first
HOOK_FILE: Final = "weir-openssl.pth"
# A .pth line that starts with "import" is executed by site.py at start-up.
HOOK_LINE: Final = "import weir_common.openssl_runtime as _weir_openssl; _weir_openssl.load()\n"


class TooLateError(RuntimeError):
    """ssl or hashlib was imported before Weir's OpenSSL could be loaded."""


class _Loaded:
    """The directory this process loaded Weir's OpenSSL from, once it has."""

    directory: Path | None = None


def library_dir(prefix: str = sys.prefix) -> Path:
    """Where an installation with prefix `prefix` keeps Weir's OpenSSL."""
    return Path(prefix, "lib", "weir-openssl")


def load(directory: Path | None = None) -> Path | None:
    """Load Weir's OpenSSL from `directory` (default: this prefix's); None if it has none.

    Returns the directory loaded from. Raises TooLateError if the process
    already runs on another OpenSSL: mixing two in one process would hand one
    library's objects to the other.
    """
    if _Loaded.directory is not None:
        return _Loaded.directory
    directory = directory or library_dir()
    if not all((directory / name).is_file() for name in LIBRARIES):
        return None
    early = sorted({"_ssl", "_hashlib"} & sys.modules.keys())
    if early:
        raise TooLateError(
            f"{', '.join(early)} already loaded on the system's OpenSSL; "
            f"{directory} must be loaded at interpreter start ({HOOK_FILE})"
        )
    for name in LIBRARIES:
        ctypes.CDLL(str(directory / name), mode=ctypes.RTLD_GLOBAL)
    _Loaded.directory = directory
    return directory


def loaded_from() -> Path | None:
    """The directory Weir's OpenSSL was loaded from in this process, or None (the system's)."""
    return _Loaded.directory


def owner() -> str:
    """Whose OpenSSL this process runs on, as node_info reports it beside the version."""
    return f"Weir's, from {_Loaded.directory}" if _Loaded.directory else "the system's"


def assess(version: tuple[int, int], *, weirs: bool, expected_dir: Path) -> tuple[bool, str]:
    """Whether TLS runs on an OpenSSL as fast as Weir's, and the log line that says so."""
    have = ".".join(map(str, version))
    if weirs:
        return True, f"TLS on Weir's OpenSSL {have}"
    if version >= SHIPPED:
        return True, f"TLS on the system's OpenSSL {have}"
    return False, (
        f"TLS on the system's OpenSSL {have}, not Weir's {'.'.join(map(str, SHIPPED))}"
        f" ({expected_dir} is missing): its AES-GCM may lack the VAES code (3.0's has none),"
        " which costs about half the bulk throughput on CPUs that have it"
    )


def write_hook(site_packages: Path) -> Path:
    """Install the start-up hook into `site_packages`; returns the file written."""
    path = site_packages / HOOK_FILE
    partial = path.with_name(HOOK_FILE + ".new")
    partial.write_text(HOOK_LINE, encoding="utf-8")
    partial.replace(path)
    return path
