"""Agent -> proxy handoff over a real Unix socket, with real netns fds."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from node_agent.constants import PROXY_UID
from node_agent.netns import Netns, entered
from node_agent.proxy_handoff.agent_side import HandoffError, ProxyHandoffServer
from node_agent.proxy_handoff.protocol import GROUP_VERSION, EnrolledPod, Hello
from node_agent.proxy_handoff.proxy_side import ProxyHandoffClient, Successors
from weir_common.errors import InvalidInputError

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]


def pod(uid: str) -> EnrolledPod:
    return EnrolledPod(uid, f"pod-{uid}", "default", "sa", ("10.0.0.1",))


class RecordingProxy:
    """A proxy handler that proves it can use each netns it is given."""

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.pods: dict[str, int] = {}
        self.netns: dict[str, Netns] = {}
        self.refuse = refuse or set()

    async def add_pod(self, p: EnrolledPod, netns: Netns) -> None:
        if p.uid in self.refuse:
            raise InvalidInputError(f"cannot listen in pod {p.uid}")
        with entered(netns):
            self.pods[p.uid] = Path("/proc/thread-self/ns/net").stat().st_ino
        self.netns.setdefault(p.uid, netns)

    async def remove_pod(self, uid: str) -> None:
        self.pods.pop(uid, None)


@pytest.fixture
def namespaces() -> Iterator[list[Netns]]:
    names = [f"weirt-h{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield [Netns.validate(f"/var/run/netns/{n}") for n in names]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


@asynccontextmanager
async def running(client: ProxyHandoffClient) -> AsyncIterator[None]:
    task = asyncio.create_task(client.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_snapshot_then_deltas(tmp_path, namespaces):
    a, b, c = namespaces
    enrolled = [(pod("a"), a), (pod("b"), b)]

    async def scenario() -> None:
        server = ProxyHandoffServer(tmp_path / "handoff.sock", lambda: list(enrolled))
        await server.start()
        proxy = RecordingProxy()
        client = ProxyHandoffClient(server.path, proxy)
        async with running(client):
            await asyncio.wait_for(client.synced.wait(), 5)
            assert proxy.pods == {"a": a.inode, "b": b.inode}
            await until(lambda: server.synced_proxies == 1)
            await server.add(pod("c"), c)
            assert proxy.pods["c"] == c.inode, "add returned before the proxy took the pod"
            await server.remove("a")
            assert set(proxy.pods) == {"b", "c"}
            assert client.pods == ["b", "c"]
        await server.close()

    asyncio.run(scenario())


def test_no_proxy_means_the_pod_is_not_handed_over(tmp_path, namespaces):
    async def scenario() -> None:
        server = ProxyHandoffServer(tmp_path / "handoff.sock", list)
        await server.start()
        with pytest.raises(HandoffError, match="no node proxy is connected"):
            await server.add(pod("a"), namespaces[0])
        await server.close()

    asyncio.run(scenario())


def test_a_nack_reaches_the_caller(tmp_path, namespaces):
    async def scenario() -> None:
        server = ProxyHandoffServer(tmp_path / "handoff.sock", list)
        await server.start()
        client = ProxyHandoffClient(server.path, RecordingProxy(refuse={"bad"}))
        async with running(client):
            await asyncio.wait_for(client.synced.wait(), 5)
            with pytest.raises(HandoffError, match="cannot listen in pod bad"):
                await server.add(pod("bad"), namespaces[0])
            await server.add(pod("good"), namespaces[1])
        await server.close()

    asyncio.run(scenario())


def test_agent_restart_resyncs_and_drops_what_went_away(tmp_path, namespaces):
    a, b, c = namespaces
    path = tmp_path / "handoff.sock"

    async def scenario() -> None:
        first = ProxyHandoffServer(path, lambda: [(pod("a"), a), (pod("b"), b)])
        await first.start()
        proxy = RecordingProxy()
        client = ProxyHandoffClient(path, proxy)
        async with running(client):
            await asyncio.wait_for(client.synced.wait(), 5)
            held_b = proxy.netns["b"]
            await first.close()
            # While the agent was away, pod a was deleted and pod c created.
            second = ProxyHandoffServer(path, lambda: [(pod("b"), b), (pod("c"), c)])
            await second.start()
            await until(lambda: set(proxy.pods) == {"b", "c"})
            await until(lambda: second.synced_proxies == 1)
            assert client.pods == ["b", "c"]
            # b was re-sent: the Netns the proxy already held must still work.
            with entered(held_b):
                assert Path("/proc/thread-self/ns/net").stat().st_ino == b.inode
            await second.close()

    asyncio.run(scenario())


def test_two_proxies_during_a_rollout_both_get_every_pod(tmp_path, namespaces):
    async def scenario() -> None:
        server = ProxyHandoffServer(tmp_path / "handoff.sock", list)
        await server.start()
        old, new = RecordingProxy(), RecordingProxy()
        old_client = ProxyHandoffClient(server.path, old)
        new_client = ProxyHandoffClient(server.path, new)
        async with running(old_client), running(new_client):
            await until(lambda: server.synced_proxies == 2)
            await server.add(pod("a"), namespaces[0])
            assert "a" in old.pods
            assert "a" in new.pods
        await server.close()

    asyncio.run(scenario())


def test_workers_of_one_proxy_are_one_successor_once_all_hold_every_pod(tmp_path, namespaces):
    """A rollout of a two-worker proxy: its workers are not each other's
    successors, and the old proxy hears of a successor holding every pod only
    once both of the new proxy's workers do."""

    async def scenario() -> None:
        server = ProxyHandoffServer(tmp_path / "handoff.sock", lambda: [(pod("a"), namespaces[0])])
        await server.start()
        old_hello, new_hello = Hello(GROUP_VERSION, "old", 2), Hello(GROUP_VERSION, "new", 2)
        old = [ProxyHandoffClient(server.path, RecordingProxy(), hello=old_hello) for _ in "12"]
        slow = asyncio.Event()

        class Slow(RecordingProxy):
            async def add_pod(self, p: EnrolledPod, netns: Netns) -> None:
                await slow.wait()
                await super().add_pod(p, netns)

        new_first = ProxyHandoffClient(server.path, RecordingProxy(), hello=new_hello)
        new_second = ProxyHandoffClient(server.path, Slow(), hello=new_hello)
        async with running(old[0]), running(old[1]):
            await until(lambda: server.synced_proxies == 2)
            assert old[0].successors == old[1].successors == Successors(0, 0)
            async with running(new_first), running(new_second):
                await until(new_first.synced.is_set)
                await until(lambda: old[0].successors == Successors(1, 0))
                # One of the new workers holds every pod, the other not yet: not synced.
                await asyncio.sleep(0.2)
                assert old[1].successors == Successors(1, 0)
                assert new_first.successors == Successors(0, 0)
                slow.set()
                await until(lambda: old[0].successors == old[1].successors == Successors(1, 1))
                dump = server.dump()
                assert [(p["group"], p["workers"]) for p in dump] == [
                    ("old", 2),
                    ("old", 2),
                    ("new", 2),
                    ("new", 2),
                ]
        await server.close()

    asyncio.run(scenario())


def test_a_stalled_proxy_times_out_instead_of_hanging_the_agent(tmp_path, namespaces):
    class Stalled(RecordingProxy):
        async def add_pod(self, p: EnrolledPod, netns: Netns) -> None:
            await asyncio.sleep(30)

    async def scenario() -> None:
        server = ProxyHandoffServer(tmp_path / "handoff.sock", list, ack_timeout=0.5)
        await server.start()
        client = ProxyHandoffClient(server.path, Stalled())
        async with running(client):
            await asyncio.wait_for(client.synced.wait(), 5)
            with pytest.raises(HandoffError, match=r"no ack within 0\.5s"):
                await server.add(pod("a"), namespaces[0])
        await server.close()

    asyncio.run(scenario())


def test_socket_is_for_root_and_the_proxy_only():
    # pytest's tmp_path sits below a root-only directory; the proxy UID must reach ours.
    base = Path(tempfile.mkdtemp(prefix="weirt-handoff-"))
    base.chmod(0o755)

    async def scenario() -> None:
        server = ProxyHandoffServer(base / "run" / "handoff.sock", list)
        await server.start()
        st = server.path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == PROXY_UID
        code = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET)\n"
            "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(13)\n"
        )
        python = os.path.realpath(sys.executable)
        for uid, expected in ((4242, 13), (PROXY_UID, 0)):
            proc = await asyncio.create_subprocess_exec(
                python, "-I", "-S", "-c", code, str(server.path), user=uid, group=uid
            )
            assert await proc.wait() == expected, f"uid {uid}"
        await server.close()
        assert not server.path.exists()

    try:
        asyncio.run(scenario())
    finally:
        shutil.rmtree(base)
