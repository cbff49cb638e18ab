"""bench/proxy_hbone.py's options: checked before the benchmark builds anything."""

from __future__ import annotations

import pytest

from bench.proxy_hbone import parse_args


def test_profile_directory_is_created(tmp_path):
    wanted = tmp_path / "profiles" / "run-1"
    args = parse_args(["--profile", str(wanted)])
    assert args.profile == wanted
    assert wanted.is_dir()


def test_profile_directory_that_cannot_be_made_is_refused_up_front(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--profile", str(blocker / "sub")])
    assert f"cannot create {blocker / 'sub'}: Not a directory" in capsys.readouterr().err
