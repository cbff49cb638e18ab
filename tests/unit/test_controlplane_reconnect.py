"""A node's client through a control-plane outage: prompt reconnect, queued registrations.

Real gRPC on loopback against an in-process control plane that is stopped
and started again on the same port (the same root, as a restarted one has).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.app import ControlPlane
from controlplane.auth import RequestRefusedError
from node_agent.agent.registrar import ControlPlaneRegistrar
from node_agent.controlplane_access import (
    RECONNECT_BACKOFF,
    REFUSED_BACKOFF,
    RESUME_SETTLE_SECONDS,
    ControlPlaneEndpoint,
    Status,
    TokenFile,
)
from node_agent.controlplane_client import ControlPlaneClient
from node_agent.enrollment.registry import PodRecord
from node_agent.redirect.config import CaptureConfig
from tests.controlplane.cp_testing import TOKENS, RecordingHandler, root_file, running_plane
from weir_common.errors import InvalidInputError
from weir_common.mesh import WORKLOAD_TYPE
from weir_common.retry import Backoff

# Long enough that gRPC's default reconnect backoff (x1.6 from 1 s, up to 120 s)
# or an uncapped exponential retry would be seconds away when the plane returns.
OUTAGE_S = 6.0
# RECONNECT_BACKOFF's 1 s ceiling, gRPC's +20 % jitter on it, and a handshake.
RECONNECT_BOUND_S = 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record(name: str, uid: str, ip: str) -> PodRecord:
    return PodRecord(
        uid=uid,
        namespace="default",
        name=name,
        service_account=name,
        container_id=f"c-{uid}",
        netns="/proc/self/ns/net",
        netns_inode=1,
        ips=(f"{ip}/24",),
        capture=CaptureConfig(),
        mode="iptables",
    )


async def _within(seconds: float, attempt: Callable[[], Awaitable[object]]) -> float:
    """Seconds until `attempt` stops raising (tried every 20 ms), failing after `seconds`."""
    started = time.monotonic()
    for _ in range(int(seconds / 0.02) + 1):
        try:
            await attempt()
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.02)
            continue
        return time.monotonic() - started
    pytest.fail(f"not within {seconds} s")


def test_defaults_bound_the_reconnect_and_back_off_from_refusals():
    assert RECONNECT_BACKOFF.maximum <= 1.0
    assert REFUSED_BACKOFF.maximum >= 30.0

    async def scenario() -> None:
        endpoint = ControlPlaneEndpoint.insecure(f"127.0.0.1:{_free_port()}")
        async with ControlPlaneClient(endpoint, "node-1", "t") as client:
            for failures in range(40):
                assert client.retry_delay(failures, Status.UNAVAILABLE) <= 1.0
                assert client.retry_delay(failures, Status.CANCELLED) <= 1.0
                assert client.retry_delay(failures, None) <= 1.0
            assert client.retry_delay(20, Status.PERMISSION_DENIED) >= 15.0
            assert client.retry_delay(20, Status.UNAUTHENTICATED) >= 15.0

    asyncio.run(scenario())


def test_queued_registration_and_ca_are_back_promptly_after_a_long_outage(tmp_path: Path):
    listen = f"127.0.0.1:{_free_port()}"

    async def scenario() -> None:
        async with running_plane(tmp_path, grpc_listen=listen):
            endpoint = ControlPlaneEndpoint.tls(listen, root_file(tmp_path))
            client = ControlPlaneClient(endpoint, "node-1", TOKENS["node-1"])
            subscription = client.subscribe(RecordingHandler())
            task = asyncio.create_task(subscription.run())
            await asyncio.wait_for(subscription.connected.wait(), 10)
            await _until_config_held(subscription)
        # The plane is gone: the stream notices, and a pod enrolled now is queued.
        await asyncio.wait_for(_until_cleared(subscription.connected), 10)
        registrar = ControlPlaneRegistrar(client)
        await registrar.register(_record("client", "uid-1", "10.1.0.5"))
        assert client.unsent == {"default/client"}
        await asyncio.sleep(OUTAGE_S)
        assert not subscription.connected.is_set()
        async with running_plane(tmp_path, grpc_listen=listen) as plane:
            back = time.monotonic()
            registered_s = await _within(
                RECONNECT_BOUND_S,
                lambda: _registered(plane, "default/client"),
            )
            assert plane.state.dump()["registrations"]["default/client"]["ips"] == ["10.1.0.5"]
            ca_s = await _within(
                RECONNECT_BOUND_S,
                lambda: client.request_certificate("spiffe://cluster.local/ns/default/sa/client"),
            )
            # Config is taken again once the other nodes had time to register theirs.
            await asyncio.wait_for(
                subscription.connected.wait(), RESUME_SETTLE_SECONDS + RECONNECT_BOUND_S
            )
            stream_s = time.monotonic() - back
            assert stream_s >= RESUME_SETTLE_SECONDS
            assert client.unsent == frozenset()
            logging.getLogger(__name__).info(
                "registered in %.2f s, CA in %.2f s, config in %.2f s",
                registered_s,
                ca_s,
                stream_s,
            )
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.channel.close(None)

    asyncio.run(scenario())


async def _registered(plane: ControlPlane, key: str) -> None:
    if key not in plane.state.registrations:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), key
        )


def test_a_resumed_stream_never_sees_a_restarted_plane_without_the_other_nodes_pods(
    tmp_path: Path,
):
    """node-2 re-registers after the plane's return: node-1 must not have taken
    config from it before (server's workload without its address)."""
    listen = f"127.0.0.1:{_free_port()}"
    seen: list[tuple[str, ...]] = []

    def record(type_url: str, resources: Any) -> None:
        if type_url == WORKLOAD_TYPE and "default/server" in resources:
            seen.append(tuple(resources["default/server"].ips))

    async def scenario() -> None:
        async with running_plane(tmp_path, grpc_listen=listen):
            endpoint = ControlPlaneEndpoint.tls(listen, root_file(tmp_path))
            node_2 = ControlPlaneClient(endpoint, "node-2", TOKENS["node-2"])
            await node_2.register_workload(
                namespace="default", name="server", uid="u-s", ips=["10.2.0.9"]
            )
            node_1 = ControlPlaneClient(endpoint, "node-1", TOKENS["node-1"])
            subscription = node_1.subscribe(RecordingHandler(_recording(record)))
            task = asyncio.create_task(subscription.run())
            await asyncio.wait_for(subscription.connected.wait(), 10)
            await _until_config_held(subscription)
        await asyncio.wait_for(_until_cleared(subscription.connected), 10)
        seen.clear()
        async with running_plane(tmp_path, grpc_listen=listen) as plane:
            # node-2 is slower to come back, yet within node-1's settle.
            await asyncio.sleep(0.5)
            node_2_stream = asyncio.create_task(node_2.subscribe(RecordingHandler()).run())
            await asyncio.wait_for(subscription.connected.wait(), 10)
            for _ in range(50):
                if "default/server" in plane.state.registrations:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # any push node-1 was going to get
            assert all(ips == ("10.2.0.9",) for ips in seen), seen
            for running_task in (task, node_2_stream):
                running_task.cancel()
            await asyncio.gather(task, node_2_stream, return_exceptions=True)
            await node_1.channel.close(None)
            await node_2.channel.close(None)

    asyncio.run(scenario())


def _recording(record: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """A RecordingHandler `reject` that accepts everything and shows it to `record`."""

    def reject(type_url: str, resources: Any) -> None:
        record(type_url, resources)

    return reject


async def _until_config_held(subscription: Any) -> None:
    """Until the first push has been taken. `connected` is set once the stream is
    open, which on a busy machine can be well before: a node stopped then held
    nothing, takes config at once on reconnect (nothing to protect), and a test
    of the settle tests nothing."""
    for _ in range(500):
        if subscription.holds_config:
            return
        await asyncio.sleep(0.02)
    pytest.fail("no config taken within 10 s")


async def _until_cleared(event: asyncio.Event) -> None:
    while event.is_set():
        await asyncio.sleep(0.02)


def test_a_registration_that_fails_while_the_stream_is_up_is_caught_up(tmp_path: Path):
    async def scenario() -> None:
        async with running_plane(tmp_path) as plane:
            endpoint = ControlPlaneEndpoint.tls(f"127.0.0.1:{plane.grpc_port}", root_file(tmp_path))
            fast = Backoff(initial=0.05, maximum=0.2)
            async with ControlPlaneClient(
                endpoint, "node-1", TOKENS["node-1"], backoff=fast, refused_backoff=fast
            ) as client:
                subscription = client.subscribe(RecordingHandler())
                task = asyncio.create_task(subscription.run())
                await asyncio.wait_for(subscription.connected.wait(), 10)
                register = plane.state.register
                calls = 0

                def overloaded_once(*args: object, **kwargs: object) -> None:
                    nonlocal calls
                    calls += 1
                    if calls == 1:
                        raise RequestRefusedError(
                            grpc.StatusCode.UNAVAILABLE, "test", "overloaded (test)"
                        )
                    register(*args, **kwargs)  # type: ignore[arg-type]

                plane.state.register = overloaded_once  # type: ignore[method-assign]
                await ControlPlaneRegistrar(client).register(_record("client", "u1", "10.1.0.7"))
                assert client.unsent == {"default/client"}
                for _ in range(100):
                    if "default/client" in plane.state.dump()["registrations"]:
                        break
                    await asyncio.sleep(0.05)
                assert plane.state.dump()["registrations"]["default/client"]["uid"] == "u1"
                assert client.unsent == frozenset()
                assert subscription.connected.is_set()  # caught up on the same stream
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_a_refused_registration_still_fails_and_is_not_kept(tmp_path: Path):
    async def scenario() -> None:
        async with running_plane(tmp_path) as plane:
            endpoint = ControlPlaneEndpoint.tls(f"127.0.0.1:{plane.grpc_port}", root_file(tmp_path))
            async with ControlPlaneClient(endpoint, "node-1", TOKENS["node-1"]) as client:
                # server is declared on node-2: node-1 may not register it.
                with pytest.raises(InvalidInputError, match="PERMISSION_DENIED") as refused:
                    await ControlPlaneRegistrar(client).register(
                        _record("server", "u2", "10.1.0.8")
                    )
                assert not refused.value.retryable
                assert "default/server" not in client.registrations
                assert client.unsent == frozenset()

    asyncio.run(scenario())


def test_a_registration_without_a_token_to_send_is_queued_not_failed(tmp_path: Path):
    async def scenario() -> None:
        endpoint = ControlPlaneEndpoint.insecure(f"127.0.0.1:{_free_port()}")
        token = TokenFile(tmp_path / "not-written-yet")
        async with ControlPlaneClient(endpoint, "node-1", token) as client:
            await ControlPlaneRegistrar(client).register(_record("client", "u3", "10.1.0.9"))
            assert client.unsent == {"default/client"}
            assert client.registrations["default/client"].ips == ("10.1.0.9",)

    asyncio.run(scenario())
