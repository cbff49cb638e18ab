"""Agent and proxy metrics: the real Enroller, XdsClient and IdentityManager move them.

The Enroller runs with a real registry and fake capture, proxy and
registrar (as in test_agent_kubernetes_follower.py); the metrics are read
back both through AgentMetrics and as Prometheus text from the agent's
health listener, which is where Prometheus scrapes them (:15021).
"""

from __future__ import annotations

import asyncio
import datetime
import re
from pathlib import Path

import pytest
import uvloop

from cni_plugin.protocol import PodInfo
from controlplane.ca import load_or_create_root
from node_agent.admin.server import AdminRegistry, HttpEndpoint
from node_agent.agent.metrics import HELP, AgentMetrics, Histogram
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import ControlPlaneClient
from node_agent.enrollment.enroller import Enroller, EnrollmentError, MeshIntent
from node_agent.enrollment.registry import PodRegistry
from node_agent.netns import Netns
from node_agent.proxy.identity import IdentityManager
from node_agent.proxy.telemetry import RENEWAL_FAILURES, RENEWALS, ProxyMetrics
from testbed.enrollment_fakes import AcceptingProxy, AcceptingRegistrar, FakeCapture
from testbed.proxy_fakes import LocalCaCertificates
from weir_common import xds_transport
from weir_common.errors import InvalidInputError
from weir_common.mesh import WORKLOAD_TYPE, SpiffeId

POD_NETNS = "/var/run/netns/cni-metrics"
NETNS_INODE = 4026532999


@pytest.fixture(autouse=True)
def pod_netns_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's netns, as Netns.validate would find it (no namespaces in unit tests)."""

    def validate(cls: type[Netns], path: str | Path) -> Netns:
        if str(path) != POD_NETNS:
            raise InvalidInputError(f"network namespace {path} does not exist")
        return cls(Path(path), NETNS_INODE)

    monkeypatch.setattr(Netns, "validate", classmethod(validate))


class Directory:
    """Pods named "out-*" stay out of the mesh; the rest are captured."""

    def lookup(self, namespace: str, name: str) -> MeshIntent | str:
        if name.startswith("out-"):
            return "workload is not captured"
        return MeshIntent(service_account=name)


def pod(name: str, n: int) -> PodInfo:
    return PodInfo(
        container_id=f"{n:064x}",
        netns=POD_NETNS,
        ifname="eth0",
        ips=(f"10.244.1.{n}/24",),
        namespace="shop",
        name=name,
        uid=f"uid-{n}",
    )


def agent(tmp_path: Path) -> tuple[Enroller, FakeCapture, AgentMetrics, PodRegistry]:
    registry = PodRegistry(tmp_path / "pods.json")
    capture = FakeCapture()
    metrics = AgentMetrics(
        pods_enrolled=lambda: sum(1 for record in registry if record.enrolled),
        xds_connected=lambda: True,
        xds_nacks=dict,
    )
    enroller = Enroller(
        capture=capture,
        mode="iptables",
        proxy=AcceptingProxy(),
        registrar=AcceptingRegistrar(),
        directory=Directory(),
        registry=registry,
        metrics=metrics,
    )
    return enroller, capture, metrics, registry


async def scrape(registry: AdminRegistry) -> str:
    """GET /metrics from a health listener (not the admin one), as Prometheus does."""
    endpoint = HttpEndpoint(registry, "127.0.0.1", 0, admin=False)
    await endpoint.start()
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await reader.read()
            writer.close()
    finally:
        await endpoint.close()
    head, _, body = response.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200"), head
    assert "Content-Type: text/plain; version=0.0.4" in head
    return body


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_enrollments_move_the_counters_histogram_and_gauge(tmp_path: Path) -> None:
    async def scenario() -> None:
        enroller, capture, metrics, registry = agent(tmp_path)
        assert (await enroller.add(pod("web", 1))).captured
        assert (await enroller.add(pod("api", 2))).captured
        assert not (await enroller.add(pod("out-batch", 3))).captured
        capture.fail_apply = True
        with pytest.raises(EnrollmentError, match="failed at capture"):
            await enroller.add(pod("db", 4))

        assert metrics.enrollments("captured") == 2
        assert metrics.enrollments("not_in_mesh") == 1
        assert metrics.enrollments("failed") == 1
        assert metrics.enrollment_latencies("captured") == 2
        assert metrics.enrollment_latencies("failed") == 1
        assert metrics.redirect_errors("iptables", "apply") == 1

        # A DEL whose capture removal fails still unenrolls, and the error is counted.
        capture.fail_remove = True
        await enroller.delete(pod("web", 1).container_id)
        assert metrics.redirect_errors("iptables", "remove") == 1

        text = await scrape(AdminRegistry(metrics=metrics.render))
        got = samples(text)
        assert got["weir_agent_pods_enrolled"] == 1  # api; web left, db rolled back
        assert got['weir_agent_enrollments_total{outcome="captured"}'] == 2
        assert got['weir_agent_enrollments_total{outcome="not_in_mesh"}'] == 1
        assert got['weir_agent_enrollments_total{outcome="failed"}'] == 1
        assert got['weir_agent_enrollment_duration_seconds_count{outcome="captured"}'] == 2
        inf_bucket = 'weir_agent_enrollment_duration_seconds_bucket{outcome="captured",le="+Inf"}'
        assert got[inf_bucket] == 2
        assert got['weir_agent_enrollment_duration_seconds_sum{outcome="captured"}'] > 0
        assert got['weir_agent_redirect_errors_total{mode="iptables",operation="apply"}'] == 1
        assert got['weir_agent_redirect_errors_total{mode="iptables",operation="remove"}'] == 1
        assert got["weir_agent_xds_connected"] == 1
        assert len(registry) == 1

    asyncio.run(scenario())


def test_every_metric_has_help_and_type_and_the_agent_prefix(tmp_path: Path) -> None:
    _, _, metrics, _ = agent(tmp_path)
    text = metrics.render()
    helps = re.findall(r"^# HELP (\S+) \S", text, re.MULTILINE)
    types = re.findall(r"^# TYPE (\S+) (counter|gauge|histogram)$", text, re.MULTILINE)
    assert helps == [name for name, _ in types] == list(HELP)
    assert all(name.startswith("weir_agent_") for name in helps)
    for key in samples(text):
        name = key.split("{")[0]
        assert name in HELP or re.sub(r"_(bucket|sum|count)$", "", name) in HELP, key


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = Histogram((0.1, 1.0))
    labels = (("outcome", "captured"),)
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(labels, value)
    assert histogram.render("h") == [
        'h_bucket{outcome="captured",le="0.1"} 2',
        'h_bucket{outcome="captured",le="1"} 3',
        'h_bucket{outcome="captured",le="+Inf"} 4',
        'h_sum{outcome="captured"} 3.65',
        'h_count{outcome="captured"} 4',
    ]
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((1.0, 0.5))


def test_an_unknown_outcome_is_refused(tmp_path: Path) -> None:
    _, _, metrics, _ = agent(tmp_path)
    with pytest.raises(ValueError, match="unknown enrollment outcome"):
        metrics.enrollment("maybe", 0.1)


class RefusingHandler:
    def apply(self, type_url: str, resources: object, updated: object, removed: object) -> None:
        raise InvalidInputError("workload shop/web: no service account")


def test_a_rejected_push_counts_a_nack_and_the_gauge_follows_the_stream() -> None:
    async def scenario() -> None:
        client = ControlPlaneClient(ControlPlaneEndpoint.insecure("127.0.0.1:1"), "n1", "t")
        try:
            xds = client.subscribe(RefusingHandler())
            metrics = AgentMetrics(
                pods_enrolled=lambda: 0,
                xds_connected=xds.connected.is_set,
                xds_nacks=lambda: xds.nacks_sent,
            )
            assert samples(metrics.render())["weir_agent_xds_connected"] == 0
            push = xds_transport.decode_response(
                xds_transport.encode_response(
                    type_url=WORKLOAD_TYPE, nonce="7", system_version="1", fragments=[], removed=[]
                )
            )
            nack = xds_transport.decode_request(xds._apply(push))
            assert nack.error_detail.message == "workload shop/web: no service account"
            xds._apply(push)
            xds.connected.set()
            got = samples(metrics.render())
            assert got['weir_agent_xds_nacks_total{type="Workload"}'] == 2
            assert got["weir_agent_xds_connected"] == 1
        finally:
            await client.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_the_proxy_counts_certificate_renewals_and_failures(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca = load_or_create_root(tmp_path / "ca", "cluster.local", now=now)
    provider = LocalCaCertificates(ca, ttl=datetime.timedelta(seconds=2))
    metrics = ProxyMetrics()
    identity = SpiffeId("cluster.local", "default", "a")

    async def scenario() -> None:
        manager = IdentityManager(provider, lambda _: None, metrics=metrics)
        await manager.acquire(identity)
        provider.fail_next = 1
        try:
            # Renewal at ~1 s fails, the retry 1 s later succeeds.
            async with asyncio.timeout(10):
                while metrics.value(RENEWALS) < 1:
                    await asyncio.sleep(0.05)
        finally:
            await manager.close()
        assert metrics.value(RENEWAL_FAILURES) == 1
        text = metrics.render()
        assert "# HELP weir_proxy_certificate_renewals_total " in text
        assert "weir_proxy_certificate_renewal_failures_total 1\n" in text

    uvloop.run(scenario())
