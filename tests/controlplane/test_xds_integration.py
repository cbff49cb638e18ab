"""Real control plane, real XdsClients, loopback gRPC."""

import asyncio
import contextlib

import grpc
import pytest
from cp_testing import (
    FAST_BACKOFF,
    MESH_YAML,
    TOKENS,
    RecordingHandler,
    endpoint,
    node_client,
    running,
    running_plane,
    subscribed,
)

from controlplane import metrics as m
from node_agent.controlplane_client import ControlPlaneClient
from weir_common import xds_transport
from weir_common.mesh import POLICY_TYPE, SERVICE_TYPE, TRUST_BUNDLE_TYPE, WORKLOAD_TYPE

pytestmark = pytest.mark.timeout(60)

NEW_WORKLOAD = (
    "  - {name: extra, namespace: default, serviceAccount: extra, node: node-2, "
    "labels: {app: server}}\n"
)


def _with_extra_workload(text: str) -> str:
    return text.replace("services:\n", NEW_WORKLOAD + "services:\n")


def test_initial_sync_and_per_node_view(tmp_path):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            one, two = RecordingHandler(), RecordingHandler()
            async with (
                subscribed(plane, tmp_path, "node-1", one),
                subscribed(plane, tmp_path, "node-2", two),
            ):
                for handler in (one, two):
                    await handler.wait_for(lambda h=handler: len(h.states) == 4)
                for handler in (one, two):
                    assert set(handler.states[WORKLOAD_TYPE]) == {
                        "default/client",
                        "default/server",
                    }
                    assert set(handler.states[SERVICE_TYPE]) == {"default/server"}
                    bundle = handler.states[TRUST_BUNDLE_TYPE]["trust-bundle"]
                    assert bundle.trust_domain == "cluster.local"
                    assert "BEGIN CERTIFICATE" in bundle.root_certificates_pem[0]
                # The policy selects the server, which runs on node-2 only.
                assert one.states[POLICY_TYPE] == {}
                assert set(two.states[POLICY_TYPE]) == {"default/server-allow-client"}
                assert plane.metrics.value(m.CONNECTED_NODES) == 2

    asyncio.run(scenario())


def test_add_update_remove_reach_nodes(tmp_path):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            handler = RecordingHandler()
            async with subscribed(plane, tmp_path, "node-1", handler):
                await handler.wait_for(lambda: len(handler.states) == 4)
                config = tmp_path / "mesh.yaml"
                # add
                config.write_text(_with_extra_workload(MESH_YAML))
                await handler.wait_for(
                    lambda: (
                        "default/extra" in handler.states[WORKLOAD_TYPE]
                        and len(handler.states[SERVICE_TYPE]["default/server"].endpoints) == 2
                    )
                )
                endpoints = handler.states[SERVICE_TYPE]["default/server"].endpoints
                assert list(endpoints) == ["default/extra", "default/server"]
                # update (local registration by the hosting node)
                async with node_client(plane, tmp_path, "node-2") as node_2:
                    await node_2.register_workload(
                        namespace="default",
                        name="extra",
                        uid="uid-extra",
                        ips=["10.1.0.7"],
                    )
                await handler.wait_for(
                    lambda: list(handler.states[WORKLOAD_TYPE]["default/extra"].ips) == ["10.1.0.7"]
                )
                assert handler.states[WORKLOAD_TYPE]["default/extra"].uid == "uid-extra"
                # remove
                config.write_text(MESH_YAML)
                await handler.wait_for(
                    lambda: (
                        "default/extra" not in handler.states[WORKLOAD_TYPE]
                        and len(handler.states[SERVICE_TYPE]["default/server"].endpoints) == 1
                    )
                )
                assert list(handler.states[SERVICE_TYPE]["default/server"].endpoints) == [
                    "default/server"
                ]
                assert plane.state.registrations == {}

    asyncio.run(scenario())


def test_invalid_file_keeps_last_good_config(tmp_path):
    async def scenario():
        async with running_plane(tmp_path) as plane:
            handler = RecordingHandler()
            async with subscribed(plane, tmp_path, "node-1", handler):
                await handler.wait_for(lambda: len(handler.states) == 4)
                generation = plane.state.snapshot.generation
                (tmp_path / "mesh.yaml").write_text(MESH_YAML + "bogus: 1\n")
                async with asyncio.timeout(5):
                    while plane.metrics.value(m.CONFIG_REJECTED) < 1:
                        await asyncio.sleep(0.02)
                assert plane.state.snapshot.generation == generation
                assert len(handler.states[WORKLOAD_TYPE]) == 2

    asyncio.run(scenario())


def test_nack_keeps_old_config_and_is_reported(tmp_path):
    def refuse_extra(type_url, resources):
        return "extra is not welcome" if "default/extra" in resources else None

    async def scenario():
        async with running_plane(tmp_path) as plane:
            handler = RecordingHandler(reject=refuse_extra)
            async with subscribed(plane, tmp_path, "node-1", handler) as client:
                await handler.wait_for(lambda: len(handler.states) == 4)
                before = client.versions(WORKLOAD_TYPE)
                (tmp_path / "mesh.yaml").write_text(_with_extra_workload(MESH_YAML))
                async with asyncio.timeout(5):
                    while plane.metrics.value(m.NACKS, type_url=WORKLOAD_TYPE) < 1:
                        await asyncio.sleep(0.02)
                assert client.versions(WORKLOAD_TYPE) == before
                assert "default/extra" not in handler.states[WORKLOAD_TYPE]
                # The service update (new endpoint) was accepted independently.
                await handler.wait_for(
                    lambda: len(handler.states[SERVICE_TYPE]["default/server"].endpoints) == 2
                )
                [stream] = plane.distribution.dump()
                rejected = stream["subscriptions"][WORKLOAD_TYPE]["rejected"]
                assert set(rejected) == {"default/extra"}
                # A later change that the node accepts flows again.
                (tmp_path / "mesh.yaml").write_text(MESH_YAML)
                await asyncio.sleep(0.3)
                assert client.versions(WORKLOAD_TYPE) == before
                assert plane.metrics.value(m.NACKS, type_url=WORKLOAD_TYPE) == 1

    asyncio.run(scenario())


def test_reconnect_resumes_from_held_versions(tmp_path):
    async def scenario():
        handler = RecordingHandler()
        async with running_plane(tmp_path) as first:
            port = first.grpc_port
            client = ControlPlaneClient(
                endpoint(first, tmp_path), "node-1", TOKENS["node-1"], backoff=FAST_BACKOFF
            )
            xds = client.subscribe(handler)
            task = asyncio.create_task(xds.run())
            await handler.wait_for(lambda: len(handler.states) == 4)
        async with client:
            # The control plane went away; the node keeps its config meanwhile.
            async with asyncio.timeout(5):
                while xds.connected.is_set():
                    await asyncio.sleep(0.01)
            assert len(handler.states[WORKLOAD_TYPE]) == 2
            handler.updates.clear()
            # A replacement comes back on the same address with one more workload.
            changed = _with_extra_workload(MESH_YAML)
            async with running_plane(tmp_path, changed, f"127.0.0.1:{port}"):
                await handler.wait_for(lambda: "default/extra" in handler.states[WORKLOAD_TYPE])
            # Resumed: only the difference was sent, not the two known workloads.
            workload_updates = [u for u in handler.updates if u[0] == WORKLOAD_TYPE]
            assert workload_updates == [(WORKLOAD_TYPE, ["default/extra"], [])]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_registrations_come_back_after_a_control_plane_restart(tmp_path):
    """The control plane keeps no state: the client registers its pods again on reconnect."""

    async def scenario():
        watcher = RecordingHandler()
        async with running_plane(tmp_path) as first:
            port = first.grpc_port
            # node-1's agent outlives this control plane.
            agent = ControlPlaneClient(
                endpoint(first, tmp_path), "node-1", TOKENS["node-1"], backoff=FAST_BACKOFF
            )
            await agent.register_workload(
                namespace="default", name="client", uid="uid-c", ips=["10.1.0.5"]
            )
            assert set(first.state.registrations) == {"default/client"}
        async with (
            agent,
            running(agent.subscribe(RecordingHandler())),
            running_plane(tmp_path, grpc_listen=f"127.0.0.1:{port}") as second,
        ):
            assert second.state.registrations == {}
            # Another node sees the pod's address again, with no re-registration by hand.
            async with subscribed(second, tmp_path, "node-2", watcher):
                await watcher.wait_for(
                    lambda: (
                        WORKLOAD_TYPE in watcher.states
                        and list(watcher.states[WORKLOAD_TYPE]["default/client"].ips)
                        == ["10.1.0.5"]
                    )
                )
            assert second.state.registrations["default/client"].uid == "uid-c"

    asyncio.run(scenario())


def test_refused_registration_is_forgotten_not_replayed(tmp_path):
    async def scenario():
        async with (
            running_plane(tmp_path) as plane,
            node_client(plane, tmp_path, "node-1") as node_1,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                # The server is declared on node-2.
                await node_1.register_workload(
                    namespace="default", name="server", uid="u", ips=["10.1.0.6"]
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert node_1.registrations == {}
            await node_1.register_workload(
                namespace="default", name="client", uid="u", ips=["10.1.0.5"]
            )
            # The config drops the pod; replaying it is refused and it is forgotten.
            (tmp_path / "mesh.yaml").write_text(
                MESH_YAML.replace(
                    "  - {name: client, namespace: default, serviceAccount: client, node: node-1, "
                    "labels: {app: client}}\n",
                    "",
                )
            )
            async with asyncio.timeout(5):
                while "default/client" in plane.state.mesh.workloads:
                    await asyncio.sleep(0.02)
            await node_1.restore_registrations()
            assert node_1.registrations == {}

    asyncio.run(scenario())


def test_wrong_node_id_and_unknown_token_are_refused(tmp_path):
    async def scenario():
        async with (
            running_plane(tmp_path) as plane,
            endpoint(plane, tmp_path).open_channel(FAST_BACKOFF) as channel,
        ):
            method = channel.stream_stream(
                xds_transport.DELTA_METHOD,
                request_serializer=xds_transport.passthrough,
                response_deserializer=xds_transport.decode_response,
            )
            for token, node, code in (
                ("not-a-token-at-all", "node-1", grpc.StatusCode.UNAUTHENTICATED),
                (TOKENS["node-1"], "node-2", grpc.StatusCode.PERMISSION_DENIED),
            ):
                call = method(None, metadata=(("authorization", f"Bearer {token}"),))
                # The refusal may come back before the write completes, or at the read.
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    async with asyncio.timeout(5):
                        await call.write(
                            xds_transport.encode_request(node_id=node, type_url=WORKLOAD_TYPE)
                        )
                        await call.read()
                assert failure.value.code() == code

    asyncio.run(scenario())
