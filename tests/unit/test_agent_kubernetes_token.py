"""Token files re-read when the kubelet rotates them; an unreadable or empty one is never sent."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import pytest

from node_agent.controlplane_access import ControlPlaneEndpoint, StaticToken, TokenFile
from node_agent.controlplane_client import ControlPlaneClient
from weir_common.errors import TransientError


def rotate(path: Path, token: str) -> None:
    """As the kubelet does: a new file swapped in under the same name."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(token + "\n")
    fresh.replace(path)


def test_the_token_is_read_again_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    tokens = TokenFile(path)
    assert tokens.token() == "first"
    rotate(path, "second")
    assert tokens.token() == "second"
    # Rewritten in place with the same size: the mtime tells.
    path.write_text("thirds\n")
    os.utime(path, ns=(1, 1))
    assert tokens.token() == "thirds"


def test_an_unreadable_or_empty_file_is_an_error_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text("good\n")
    tokens = TokenFile(path)
    assert tokens.token() == "good"
    path.write_text("  \n")
    caplog.set_level(logging.ERROR)
    for _ in range(3):
        with pytest.raises(TransientError, match="is empty"):
            tokens.token()
    assert [r.getMessage() for r in caplog.records] == [f"token file {path} is empty"]
    path.unlink()
    with pytest.raises(TransientError, match="cannot read token file"):
        tokens.token()
    rotate(path, "back")
    assert tokens.token() == "back"


def test_denied_after_a_privilege_drop_keeps_the_token_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text("read-as-root\n")
    kept, strict = TokenFile(path, keep_when_denied=True), TokenFile(path)
    assert kept.token() == strict.token() == "read-as-root"
    real_stat = Path.stat

    def denied(self: Path, **kwargs: bool) -> os.stat_result:
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", denied)
    caplog.set_level(logging.WARNING)
    assert kept.token() == kept.token() == "read-as-root"
    assert len([r for r in caplog.records if "keeping the token" in r.getMessage()]) == 1
    with pytest.raises(TransientError, match="Permission denied"):
        strict.token()


def test_the_client_sends_the_current_token_and_nothing_without_one(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")

    async def scenario() -> None:
        endpoint = ControlPlaneEndpoint.insecure("127.0.0.1:9")
        async with ControlPlaneClient(endpoint, "n1", TokenFile(path)) as client:
            assert client.metadata == (("authorization", "Bearer one"),)
            rotate(path, "two")
            assert client.metadata == (("authorization", "Bearer two"),)
            path.write_text("")
            # A removal that could not be sent is kept, to be sent once there is a token.
            with pytest.raises(TransientError):
                await client.deregister_workload(namespace="shop", name="web", uid="u1")
            assert list(client.unconfirmed_removals) == ["u1"]
        async with ControlPlaneClient(endpoint, "n1", "fixed") as client:
            assert client.metadata == (("authorization", "Bearer fixed"),)

    asyncio.run(scenario())
    assert repr(StaticToken("secret")) == "StaticToken(...)"
