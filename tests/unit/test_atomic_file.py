"""weir_common.atomic_file: the file is either the old one or the new one, never a mix."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from weir_common import atomic_file
from weir_common.atomic_file import TEMP_SUFFIX, write_atomically


def test_replaces_the_file_with_exactly_the_mode_asked(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_atomically(path, b"new", 0o644)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_private_by_default_and_owner_as_asked(tmp_path: Path):
    path = tmp_path / "key"
    write_atomically(path, b"secret", owner=(65534, 65534))
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.conflist"
    path.write_bytes(b"old")

    def no_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic_file.os, "fsync", no_sync)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.conflist"]


def test_temporary_names_end_with_a_suffix_no_config_reader_takes(tmp_path, monkeypatch):
    seen: list[str] = []
    real_replace = Path.replace

    def spy(self: Path, target: Path) -> Path:
        seen.append(self.name)
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    write_atomically(tmp_path / "10-weir.conflist", b"{}")
    assert len(seen) == 1
    assert seen[0].startswith(".10-weir.conflist.")
    assert seen[0].endswith(TEMP_SUFFIX)
