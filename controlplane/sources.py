"""Config sources: where the mesh config comes from.

A source yields whole, validated MeshConfigs. The file source watches the
YAML file; a Kubernetes source (later) will implement the same protocol from
informers. Distribution never knows which source it is fed by.
"""

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from controlplane import metrics as m
from controlplane.config_file import ConfigError, parse_bytes
from controlplane.mesh import MeshConfig

log = logging.getLogger(__name__)


class ConfigSource(Protocol):
    def load(self) -> MeshConfig:
        """The current config; raises if there is none usable (startup fails)."""
        ...

    async def watch(self, publish: Callable[[MeshConfig], None]) -> None:
        """Call `publish` with each new valid config until cancelled."""
        ...


class FileSource:
    """The YAML file, polled for changes; bad contents keep the last good config."""

    def __init__(self, path: Path, metrics: m.Metrics, interval: float = 1.0) -> None:
        self._path = path
        self._metrics = metrics
        self._interval = interval
        self._digest = b""

    def load(self) -> MeshConfig:
        data = self._read()
        mesh = parse_bytes(data, source=str(self._path))
        self._digest = hashlib.sha256(data).digest()
        return mesh

    async def watch(self, publish: Callable[[MeshConfig], None]) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                data = self._read()
            except ConfigError as exc:
                log.warning("%s", exc)
                continue
            digest = hashlib.sha256(data).digest()
            if digest == self._digest:
                continue
            self._digest = digest
            try:
                mesh = parse_bytes(data, source=str(self._path))
            except ConfigError as exc:
                self._metrics.inc(m.CONFIG_REJECTED)
                log.error("rejected new config, keeping the last good one: %s", exc)
                continue
            log.info("loaded new config from %s", self._path)
            publish(mesh)

    def _read(self) -> bytes:
        try:
            return self._path.read_bytes()
        except OSError as exc:
            raise ConfigError(str(self._path), "", f"cannot read: {exc}") from exc
