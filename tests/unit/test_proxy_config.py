"""From xDS resources to the proxy's MeshSnapshot, and the CLI's argument parsing."""

from __future__ import annotations

import argparse

import pytest

from node_agent.proxy.cli import hbone_keepalive, parse_listen, parse_pod
from node_agent.proxy.http2.keepalive import KeepaliveSettings
from node_agent.proxy.model import Action, MtlsMode
from node_agent.proxy.xds_source import SnapshotHandler
from testbed.proxy_fakes import self_signed_root_pem
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.errors import InvalidInputError
from weir_common.mesh import POLICY_TYPE, SERVICE_TYPE, TRUST_BUNDLE_TYPE, WORKLOAD_TYPE

WORKLOAD = mesh_pb2.Workload(
    uid="u1",
    name="b",
    namespace="default",
    service_account="b-sa",
    node="node-2",
    ips=["10.244.2.2"],
    labels={"app": "b"},
    captured=True,
    mtls_mode=mesh_pb2.PERMISSIVE,
)
SERVICE = mesh_pb2.Service(
    name="b",
    namespace="default",
    vips=["10.96.0.10"],
    ports=[mesh_pb2.ServicePort(name="http", port=80, target_port=8080)],
    endpoints=["default/b"],
)
POLICY = mesh_pb2.AuthorizationPolicy(
    name="allow-a",
    namespace="default",
    selector={"app": "b"},
    action=mesh_pb2.ALLOW,
    rules=[mesh_pb2.Rule(source_principals=["spiffe://cluster.local/ns/default/sa/a"])],
)


ROOT_PEM = self_signed_root_pem()
BUNDLE = mesh_pb2.TrustBundle(trust_domain="cluster.local", root_certificates_pem=[ROOT_PEM])


def feed(handler: SnapshotHandler, type_url: str, resources: dict) -> None:
    handler.apply(type_url, resources, list(resources), [])


def test_nothing_is_published_before_every_type_arrived():
    # The proxy serves pods from its first snapshot on: it must be the whole mesh.
    published = []
    handler = SnapshotHandler(published.append)
    feed(handler, WORKLOAD_TYPE, {"default/b": WORKLOAD})
    feed(handler, SERVICE_TYPE, {})
    feed(handler, POLICY_TYPE, {})
    assert published == []
    feed(handler, TRUST_BUNDLE_TYPE, {"trust-bundle": BUNDLE})
    assert len(published) == 1
    assert published[0].workloads["default/b"].mtls_mode is MtlsMode.PERMISSIVE
    published.clear()
    handler = SnapshotHandler(published.append)
    feed(handler, TRUST_BUNDLE_TYPE, {"trust-bundle": BUNDLE})
    feed(handler, WORKLOAD_TYPE, {"default/b": WORKLOAD})
    feed(handler, SERVICE_TYPE, {})
    assert published == []
    feed(handler, POLICY_TYPE, {})
    assert len(published) == 1


def test_every_type_lands_in_the_snapshot():
    published = []
    handler = SnapshotHandler(published.append)
    for type_url, resources in (
        (TRUST_BUNDLE_TYPE, {"trust-bundle": BUNDLE}),
        (WORKLOAD_TYPE, {"default/b": WORKLOAD}),
        (SERVICE_TYPE, {"default/b": SERVICE}),
        (POLICY_TYPE, {"default/allow-a": POLICY}),
    ):
        feed(handler, type_url, resources)
    snapshot = published[-1]
    assert snapshot.trust_domain == "cluster.local"
    assert snapshot.trust_bundle_pem == (ROOT_PEM,)
    assert snapshot.workload_by_ip("10.244.2.2").service_account == "b-sa"
    assert snapshot.service_by_vip("10.96.0.10").target_port(80) == 8080
    policy = snapshot.policies["default/allow-a"]
    assert policy.action is Action.ALLOW
    assert policy.selects(snapshot.workloads["default/b"])
    assert snapshot.dump()["policies"]["default/allow-a"]["action"] == "ALLOW"


@pytest.mark.parametrize(
    ("type_url", "resource"),
    [
        (WORKLOAD_TYPE, mesh_pb2.Workload(name="x", namespace="d", ips=["not-an-ip"])),
        (POLICY_TYPE, mesh_pb2.AuthorizationPolicy(name="p", namespace="d")),
        (
            POLICY_TYPE,
            mesh_pb2.AuthorizationPolicy(
                name="p",
                namespace="d",
                action=mesh_pb2.DENY,
                rules=[mesh_pb2.Rule(source_ip_blocks=["10.0.0.0/33"])],
            ),
        ),
    ],
    ids=["bad-ip", "no-action", "bad-cidr"],
)
def test_bad_config_is_rejected_and_the_last_good_one_kept(type_url, resource):
    published = []
    handler = SnapshotHandler(published.append)
    feed(handler, TRUST_BUNDLE_TYPE, {"trust-bundle": BUNDLE})
    with pytest.raises(InvalidInputError):
        feed(handler, type_url, {"d/x": resource})
    for other in (WORKLOAD_TYPE, POLICY_TYPE):
        feed(handler, other, {})
    feed(handler, SERVICE_TYPE, {"default/b": SERVICE})  # later changes still apply
    assert len(published) == 1
    assert published[-1].workloads == {} and published[-1].policies == {}


def test_parse_listen():
    assert parse_listen("0.0.0.0:15020") == ("0.0.0.0", 15020)
    assert parse_listen("[::1]:15020") == ("::1", 15020)
    for bad in ("15020", "host:", "host:99999", ":80"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_listen(bad)


def test_parse_pod_refuses_malformed_and_missing_netns(tmp_path):
    for bad in ("default/a", "a=/x", "/a=/x", "default/=/x"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAMESPACE/NAME=NETNS"):
            parse_pod(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        parse_pod(f"default/a={tmp_path / 'nope'}")


def test_hbone_keepalive_flags():
    assert hbone_keepalive(15, 10) == KeepaliveSettings(interval=15, timeout=10)
    assert hbone_keepalive(0, 10) is None  # off
    assert hbone_keepalive(0, 0) is None
    with pytest.raises(InvalidInputError, match="timeout-seconds must be above 0"):
        hbone_keepalive(5, 0)
