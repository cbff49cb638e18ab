"""A config watch that dies takes the control plane's readiness down and is restarted."""

from __future__ import annotations

import asyncio
import datetime
import urllib.request
from collections.abc import Callable
from urllib.error import HTTPError

from cp_testing import MESH_YAML

from controlplane.app import ControlPlane, Settings
from controlplane.ca import load_or_create_root
from controlplane.config_file import parse
from controlplane.mesh import MeshConfig


class CrashingSource:
    """Loads fine; its watch fails at once, as a bug in a config source would."""

    def __init__(self, mesh: MeshConfig) -> None:
        self.mesh = mesh
        self.watches = 0

    def load(self) -> MeshConfig:
        return self.mesh

    async def watch(self, publish: Callable[[MeshConfig], None]) -> None:
        self.watches += 1
        raise RuntimeError("watch bug")


def ready_status(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=5) as r:
            return int(r.status)
    except HTTPError as e:
        return e.code


def test_a_dead_config_watch_makes_the_control_plane_unready_and_is_restarted(tmp_path):
    async def scenario() -> None:
        mesh = parse(MESH_YAML, source="mesh.yaml")
        source = CrashingSource(mesh)
        plane = ControlPlane(
            source=source,
            mesh=mesh,
            ca=load_or_create_root(
                tmp_path, mesh.trust_domain, now=datetime.datetime.now(datetime.UTC)
            ),
            settings=Settings(grpc_listen="127.0.0.1:0", http_listen="127.0.0.1:0"),
        )
        await plane.start()
        try:
            async with asyncio.timeout(5):
                while plane.ready:
                    await asyncio.sleep(0.05)
            status = await asyncio.to_thread(ready_status, plane.http_port)
            assert status == 503
            assert "config watch crashed: RuntimeError('watch bug')" in str(
                plane.supervisor.not_ready()
            )
            async with asyncio.timeout(10):
                while source.watches < 2:
                    await asyncio.sleep(0.05)
        finally:
            await plane.stop(grace=0.5)

    asyncio.run(scenario())
