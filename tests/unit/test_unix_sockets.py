"""node_agent.unix_sockets: peer credentials and sockets private from the moment they appear."""

from __future__ import annotations

import os
import socket
import stat
from contextlib import closing

import pytest

from node_agent.unix_sockets import bind_private, peer_credentials


def test_peer_credentials_name_the_connecting_process():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with closing(a), closing(b):
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def test_bind_private_appears_listening_with_its_mode_and_owner(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("stale")
    old_umask = os.umask(0)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            bind_private(listener, path, 0o600, owner=(65534, 65534), backlog=1)
            st = path.lstat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert (st.st_uid, st.st_gid) == (65534, 65534)
            assert [p.name for p in tmp_path.iterdir()] == ["s.sock"]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(path))
    finally:
        os.umask(old_umask)


def test_bind_private_leaves_nothing_when_binding_fails(tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as taken:
        taken.bind(str(tmp_path / "other.sock"))
        with pytest.raises(OSError):
            bind_private(taken, path, 0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["other.sock"]
