"""The handoff socket is private from the moment it exists, without touching the umask.

The agent is threaded (CNI requests run on worker threads); changing the
process-wide umask to bind one socket would change the mode of whatever file
another thread creates at that moment.
"""

from __future__ import annotations

import asyncio
import os
import stat

from node_agent.proxy_handoff.agent_side import ProxyHandoffServer


def test_the_socket_is_0600_and_the_umask_is_never_changed(tmp_path, monkeypatch):
    calls: list[int] = []
    real_umask = os.umask

    def recording_umask(mask: int) -> int:
        calls.append(mask)
        return real_umask(mask)

    async def scenario() -> None:
        server = ProxyHandoffServer(tmp_path / "run" / "proxy.sock", list)
        await server.start()
        try:
            mode = (tmp_path / "run" / "proxy.sock").stat().st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
        finally:
            await server.close()

    previous = os.umask(0)  # the loosest umask a runtime could hand us
    monkeypatch.setattr(os, "umask", recording_umask)
    try:
        asyncio.run(scenario())
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert calls == []
