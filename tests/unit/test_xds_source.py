"""A rejected push leaves the proxy on the previous snapshot: nothing is kept before it passed."""

from __future__ import annotations

import pytest

from node_agent.proxy.xds_source import SnapshotHandler
from testbed.proxy_fakes import SnapshotConsumer, self_signed_root_pem
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.errors import InvalidInputError
from weir_common.mesh import POLICY_TYPE, SERVICE_TYPE, TRUST_BUNDLE_TYPE, WORKLOAD_TYPE

ROOT = self_signed_root_pem()


def bundle(*roots: str, trust_domain: str = "cluster.local") -> mesh_pb2.TrustBundle:
    return mesh_pb2.TrustBundle(trust_domain=trust_domain, root_certificates_pem=list(roots))


def workload(name: str) -> mesh_pb2.Workload:
    return mesh_pb2.Workload(
        uid=f"uid-{name}",
        name=name,
        namespace="default",
        service_account=name,
        node="node-1",
        ips=[f"10.0.0.{len(name)}"],
    )


def synced(consumer: SnapshotConsumer) -> SnapshotHandler:
    handler = SnapshotHandler(consumer)
    for type_url, resources in (
        (TRUST_BUNDLE_TYPE, {"trust-bundle": bundle(ROOT)}),
        (WORKLOAD_TYPE, {"default/a": workload("a")}),
        (SERVICE_TYPE, {}),
        (POLICY_TYPE, {}),
    ):
        handler.apply(type_url, resources, list(resources), [])
    return handler


def test_a_failed_publish_is_a_rejection_and_the_previous_snapshot_stays_in_force():
    consumer = SnapshotConsumer()
    handler = synced(consumer)
    before = consumer.in_force
    assert before is not None
    consumer.refuse = "default/bad"
    pushed = {"default/a": workload("a"), "default/bad": workload("bad")}
    with pytest.raises(InvalidInputError, match="RuntimeError: cannot serve default/bad"):
        handler.apply(WORKLOAD_TYPE, pushed, ["default/bad"], [])
    assert consumer.in_force is before
    # The next accepted push builds on what was accepted, not on the rejected one.
    consumer.refuse = None
    handler.apply(SERVICE_TYPE, {}, [], [])
    assert consumer.in_force is not None
    assert set(consumer.in_force.workloads) == {"default/a"}


@pytest.mark.parametrize(
    ("roots", "trust_domain", "error"),
    [
        ((), "cluster.local", "without root certificates"),
        (("-----BEGIN nonsense",), "cluster.local", "trust bundle root 1: not a PEM CA"),
        ((ROOT, "not a certificate"), "cluster.local", "trust bundle root 2: not a PEM CA"),
        # ssl takes "" as cadata without a word; an empty root is still no root.
        ((ROOT, ""), "cluster.local", "trust bundle root 2: not a PEM CA"),
        ((ROOT,), "", "without a trust domain"),
        # Each loads alone, but the proxy loads them concatenated.
        ((ROOT.rstrip("\n"), ROOT), "cluster.local", "trust bundle roots together"),
    ],
    ids=[
        "no-roots",
        "garbage",
        "second-root-garbage",
        "second-root-empty",
        "no-trust-domain",
        "no-final-newline",
    ],
)
def test_a_trust_bundle_the_proxy_could_not_load_is_rejected(roots, trust_domain, error):
    consumer = SnapshotConsumer()
    handler = synced(consumer)
    before = consumer.in_force
    bad = {"trust-bundle": bundle(*roots, trust_domain=trust_domain)}
    with pytest.raises(InvalidInputError, match=error):
        handler.apply(TRUST_BUNDLE_TYPE, bad, ["trust-bundle"], [])
    assert consumer.in_force is before
    handler.apply(SERVICE_TYPE, {}, [], [])
    assert consumer.in_force is not None
    assert consumer.in_force.trust_bundle_pem == (ROOT,)


def test_removing_the_trust_bundle_is_rejected():
    consumer = SnapshotConsumer()
    handler = synced(consumer)
    with pytest.raises(InvalidInputError, match="removes the trust bundle"):
        handler.apply(TRUST_BUNDLE_TYPE, {}, [], ["trust-bundle"])
    handler.apply(WORKLOAD_TYPE, {"default/b": workload("b")}, ["default/b"], ["default/a"])
    assert consumer.in_force is not None
    assert set(consumer.in_force.workloads) == {"default/b"}
    assert consumer.in_force.trust_bundle_pem == (ROOT,)
