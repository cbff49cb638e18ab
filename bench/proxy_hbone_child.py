"""One node's Weir proxy for bench/proxy_hbone.py, as its own process (started by it).

    python bench/proxy_hbone_child.py CONFIG.json

It imports what `weir proxy run` imports (node_agent.proxy.cli: uvloop,
protobuf, its own gRPC client) and little more, so its resident memory is a
node proxy's: the benchmark's own libraries (pyroute2, python-iptables, the
topology, the CA and the cryptography package it runs on) stay in the parent.
Config and certificates come from the JSON file instead of the control plane:
the parent issues each identity's certificate (key and chain, as the CA would
answer a node's CSR); the control-plane client is imported, not connected.

After "ready", each line on stdin is
{"workloads": [...], "certificates": {...}, "pods": [{"key", "netns"}]}:
the workloads join the mesh, the pods are enrolled, and "added N" is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import uvloop

import node_agent.proxy.cli  # noqa: F401 - a node proxy's libraries, for its memory figure
from node_agent.netns import Netns
from node_agent.proxy.identity import WorkloadCertificate
from node_agent.proxy.model import MeshSnapshot, MtlsMode, Workload
from node_agent.proxy.proxy import ProxySettings, build
from node_agent.proxy.telemetry import AccessLog
from testbed.proxy_fakes import StaticConfigSource
from weir_common.mesh import SpiffeId

READY: Final = "ready"


def workload_json(workload: Workload) -> dict[str, object]:
    return {**dataclasses.asdict(workload), "mtls_mode": workload.mtls_mode.value}


def certificate_json(cert: WorkloadCertificate) -> dict[str, object]:
    return {"chain": list(cert.chain_pem), "key": cert.private_key_pem.decode("ascii")}


class IssuedCertificates:
    """A CertificateProvider answering from the certificates the parent issued."""

    def __init__(self) -> None:
        self._issued: dict[str, WorkloadCertificate] = {}

    def add(self, certificates: Mapping[str, Mapping[str, object]]) -> None:
        for identity, raw in certificates.items():
            chain, key = raw["chain"], raw["key"]
            assert isinstance(chain, list) and isinstance(key, str)
            self._issued[identity] = WorkloadCertificate.from_pem(tuple(chain), key.encode())

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        try:
            return self._issued[str(identity)]
        except KeyError:
            raise LookupError(f"the benchmark issued no certificate for {identity}") from None


def workload_from_json(raw: Mapping[str, object]) -> Workload:
    fields = dict(raw)
    ips = fields.pop("ips")
    mode = fields.pop("mtls_mode")
    assert isinstance(ips, list) and isinstance(mode, str)
    return Workload(**fields, ips=tuple(ips), mtls_mode=MtlsMode(mode))  # type: ignore[arg-type]


async def run_proxy(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    trust_domain = config["trust_domain"]
    trust_bundle = tuple(config["trust_bundle"])
    workloads = {w.key: w for w in map(workload_from_json, config["workloads"])}
    certificates = IssuedCertificates()
    certificates.add(config["certificates"])

    def snapshot() -> MeshSnapshot:
        return MeshSnapshot(trust_domain, trust_bundle, workloads=dict(workloads))

    source = StaticConfigSource(snapshot())
    settings = dataclasses.replace(ProxySettings(), metrics_address=None, readiness_address=None)
    proxy = build(
        settings,
        config=source,
        certificates=certificates,
        # The proxy's own access log, writer thread and all, into /dev/null.
        access_log=AccessLog(fd=os.open(os.devnull, os.O_WRONLY)),
    )
    await proxy.start()
    for pod in config["pods"]:
        await proxy.add_pod(Netns.validate(pod["netns"]), workloads[pod["key"]])

    async def enroll_from_stdin() -> None:
        reader = asyncio.StreamReader(limit=64 << 20)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            request = json.loads(line)
            certificates.add(request["certificates"])
            for raw in request["workloads"]:
                workload = workload_from_json(raw)
                workloads[workload.key] = workload
            source.set(snapshot())
            for pod in request["pods"]:
                await proxy.add_pod(Netns.validate(pod["netns"]), workloads[pod["key"]])
            print(f"added {len(request['pods'])}", flush=True)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    commands = asyncio.create_task(enroll_from_stdin())
    print(READY, flush=True)
    await stop.wait()
    commands.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await commands
    await proxy.shutdown(1.0)


if __name__ == "__main__":
    uvloop.run(run_proxy(sys.argv[1]))
