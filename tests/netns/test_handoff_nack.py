"""One pod the proxy cannot take is nacked; the handoff stays in sync for every other pod.

A real Proxy behind the real handoff, in real namespaces: the pod whose
outbound capture port is already taken (as when two proxies overlap) makes
the proxy's listener open fail with EADDRINUSE.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import pytest

from controlplane.ca import load_or_create_root
from node_agent.constants import OUTBOUND_CAPTURE_PORT
from node_agent.netns import Netns, entered
from node_agent.proxy.agent_pods import AgentPods
from node_agent.proxy.model import MeshSnapshot
from node_agent.proxy.proxy import Proxy, ProxySettings, build
from node_agent.proxy_handoff.agent_side import HandoffError, ProxyHandoffServer
from node_agent.proxy_handoff.protocol import EnrolledPod
from node_agent.proxy_handoff.proxy_side import ProxyHandoffClient
from testbed.proxy_fakes import LocalCaCertificates, StaticConfigSource

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

TRUST_DOMAIN = "cluster.local"
# Generous: the machine is shared; this bounds a wait, it measures nothing.
SYNC_TIMEOUT = 15.0


def pod(uid: str) -> EnrolledPod:
    return EnrolledPod(uid, f"pod-{uid}", "default", f"sa-{uid}", ("10.0.0.1",))


@pytest.fixture
def namespaces() -> Iterator[dict[str, Netns]]:
    names = {role: f"weirt-n{uuid.uuid4().hex[:8]}" for role in ("taken", "early", "late")}
    for name in names.values():
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield {role: Netns.validate(f"/var/run/netns/{n}") for role, n in names.items()}
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], check=False)


def occupy(netns: Netns, port: int) -> socket.socket:
    """Listen on `port` in `netns` without SO_REUSEPORT, as another proxy would."""
    with entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", port))
    sock.listen()
    return sock


@asynccontextmanager
async def real_proxy(tmp_path: Path) -> AsyncIterator[Proxy]:
    ca = load_or_create_root(tmp_path / "ca", TRUST_DOMAIN, now=datetime.datetime.now(datetime.UTC))
    config = StaticConfigSource(MeshSnapshot(TRUST_DOMAIN, tuple(ca.trust_bundle_pem)))
    proxy = build(
        ProxySettings(metrics_address=None, first_config_timeout=SYNC_TIMEOUT),
        config=config,
        certificates=LocalCaCertificates(ca),
    )
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.shutdown(deadline=1.0)


@asynccontextmanager
async def following(server: ProxyHandoffServer, proxy: Proxy) -> AsyncIterator[None]:
    client = ProxyHandoffClient(server.path, AgentPods(proxy, "node-1"))
    task = asyncio.create_task(client.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def synced(server: ProxyHandoffServer, proxies: int = 1) -> None:
    async with asyncio.timeout(SYNC_TIMEOUT):
        while server.synced_proxies != proxies:
            await asyncio.sleep(0.02)


def test_a_port_in_use_nacks_that_pod_and_others_still_sync(tmp_path, namespaces):
    taken, early, late = namespaces["taken"], namespaces["early"], namespaces["late"]

    async def scenario() -> None:
        server = ProxyHandoffServer(
            tmp_path / "handoff.sock", lambda: [(pod("taken"), taken), (pod("early"), early)]
        )
        await server.start()
        with closing(occupy(taken, OUTBOUND_CAPTURE_PORT)) as squatter:
            async with real_proxy(tmp_path) as proxy, following(server, proxy):
                # The snapshot's failing pod did not end the session.
                await synced(server)
                assert proxy.pod("taken") is None
                assert proxy.pod("early") is not None
                # An ADD while connected is taken.
                await server.add(pod("late"), late)
                assert proxy.pod("late") is not None
                # An ADD of the blocked pod is refused, saying why.
                with pytest.raises(
                    HandoffError,
                    match=rf"pod taken: .*IPv4 port {OUTBOUND_CAPTURE_PORT} .*"
                    r"Address already in use",
                ):
                    await server.add(pod("taken"), taken)
                assert server.synced_proxies == 1
                # Nothing of the refused pod was left half open: freed, it is taken.
                squatter.close()
                await server.add(pod("taken"), taken)
                assert proxy.pod("taken") is not None
        await server.close()

    asyncio.run(scenario())


def test_a_successor_proxy_takes_every_pod_while_the_old_one_still_listens(tmp_path, namespaces):
    # A rolling update with maxSurge: the new proxy opens the same ports in each
    # pod beside the old one (SO_REUSEPORT, same UID), so both ack every pod,
    # and the old one leaving takes nothing from the new one.
    early, late, third = namespaces["early"], namespaces["late"], namespaces["taken"]

    async def scenario() -> None:
        server = ProxyHandoffServer(tmp_path / "handoff.sock", lambda: [(pod("early"), early)])
        await server.start()
        async with real_proxy(tmp_path / "new") as new, following(server, new):
            async with real_proxy(tmp_path / "old") as old, following(server, old):
                await synced(server, proxies=2)
                await server.add(pod("late"), late)
                for proxy in (old, new):
                    assert proxy.pod("early") is not None and proxy.pod("late") is not None
            # The next pod goes to the new proxy alone: the old one's leaving fails nothing.
            await server.add(pod("third"), third)
            assert server.synced_proxies == 1
            for uid in ("early", "late", "third"):
                assert new.pod(uid) is not None
            # The new proxy's listener still answers in the pod once the old one is gone.
            subprocess.run(["ip", "-n", late.path.name, "link", "set", "lo", "up"], check=True)
            with entered(late):
                probe = socket.create_connection(("127.0.0.1", OUTBOUND_CAPTURE_PORT), timeout=5)
            probe.close()
        await server.close()

    asyncio.run(scenario())


def test_a_vanished_netns_fails_that_pod_only(tmp_path, namespaces):
    gone, early, late = namespaces["taken"], namespaces["early"], namespaces["late"]

    async def scenario() -> None:
        server = ProxyHandoffServer(
            tmp_path / "handoff.sock", lambda: [(pod("gone"), gone), (pod("early"), early)]
        )
        await server.start()
        # The runtime deleted the sandbox while the agent still lists the pod.
        subprocess.run(["ip", "netns", "del", gone.path.name], check=True)
        async with real_proxy(tmp_path) as proxy, following(server, proxy):
            await synced(server)
            assert proxy.pod("early") is not None
            with pytest.raises(HandoffError, match="cannot open the netns of pod gone"):
                await server.add(pod("gone"), gone)
            await server.add(pod("late"), late)
            assert proxy.pod("late") is not None
        await server.close()

    asyncio.run(scenario())


class FailingHandler:
    """Takes every pod but those in `failures`, which raise what is given."""

    def __init__(self, failures: dict[str, Exception]) -> None:
        self.failures = failures
        self.pods: set[str] = set()

    async def add_pod(self, p: EnrolledPod, netns: Netns) -> None:
        if p.uid in self.failures:
            raise self.failures[p.uid]
        self.pods.add(p.uid)

    async def remove_pod(self, uid: str) -> None:
        self.pods.discard(uid)


def test_any_failure_of_one_pod_is_a_nack_not_a_disconnect(tmp_path, namespaces):
    # Not only WeirError: a raw OSError, or a bug, concerns that pod alone.
    handler = FailingHandler(
        {
            "busy": OSError(errno.EADDRINUSE, "Address already in use"),
            "buggy": KeyError("oops"),
        }
    )
    ns = namespaces["early"]

    async def scenario() -> None:
        server = ProxyHandoffServer(
            tmp_path / "handoff.sock", lambda: [(pod("busy"), ns), (pod("buggy"), ns)]
        )
        await server.start()
        client = ProxyHandoffClient(server.path, handler)
        task = asyncio.create_task(client.run())
        try:
            await synced(server)
            with pytest.raises(HandoffError, match=r"pod busy: OSError: .*Address already in use"):
                await server.add(pod("busy"), ns)
            with pytest.raises(HandoffError, match=r"pod buggy: KeyError: 'oops'"):
                await server.add(pod("buggy"), ns)
            await server.add(pod("fine"), ns)
            assert handler.pods == {"fine"}
            assert client.pods == ["fine"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await server.close()

    asyncio.run(scenario())
