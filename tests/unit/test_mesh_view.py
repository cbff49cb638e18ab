"""The agent's copy of the mesh: lookups for enrollment, validation before accepting."""

from __future__ import annotations

import pytest

from node_agent.enrollment.enroller import MeshIntent
from node_agent.mesh_view import MeshView
from testbed.proxy_fakes import self_signed_root_pem
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.errors import InvalidInputError, TransientError
from weir_common.mesh import POLICY_TYPE, SERVICE_TYPE, TRUST_BUNDLE_TYPE, WORKLOAD_TYPE


def workload(name: str, node: str, captured: bool = True) -> mesh_pb2.Workload:
    return mesh_pb2.Workload(
        name=name, namespace="default", service_account=f"sa-{name}", node=node, captured=captured
    )


def synced_view() -> MeshView:
    view = MeshView("node-1")
    bundle = mesh_pb2.TrustBundle(
        trust_domain="cluster.local", root_certificates_pem=[self_signed_root_pem()]
    )
    view.apply(TRUST_BUNDLE_TYPE, {"trust-bundle": bundle}, ["trust-bundle"], [])
    pods = {
        "default/a": workload("a", "node-1"),
        "default/b": workload("b", "node-2"),
        "default/c": workload("c", "node-1", captured=False),
    }
    view.apply(WORKLOAD_TYPE, pods, list(pods), [])
    view.apply(SERVICE_TYPE, {}, [], [])
    view.apply(POLICY_TYPE, {}, [], [])
    return view


def test_lookup_answers_who_a_pod_is_or_why_it_stays_out():
    view = synced_view()
    assert view.lookup("default", "a") == MeshIntent(service_account="sa-a")
    assert view.lookup("default", "b") == "default/b belongs on node node-2, not node-1"
    assert view.lookup("default", "c") == "default/c is configured as not captured"
    assert view.lookup("default", "zz") == "default/zz is not a workload of the mesh config"


def test_before_config_arrives_enrollment_must_retry():
    view = MeshView("node-1")
    with pytest.raises(TransientError, match="not received"):
        view.lookup("default", "a")


def test_a_bad_trust_bundle_is_rejected_and_the_old_one_kept():
    view = synced_view()
    before = view.trust_bundle()
    bad = mesh_pb2.TrustBundle(trust_domain="x", root_certificates_pem=["-----BEGIN nonsense"])
    with pytest.raises(InvalidInputError, match="unparsable certificate"):
        view.apply(TRUST_BUNDLE_TYPE, {"trust-bundle": bad}, ["trust-bundle"], [])
    assert view.trust_bundle() == before


def test_a_push_replaces_the_type_and_dump_is_plain_data():
    view = synced_view()
    view.apply(
        WORKLOAD_TYPE, {"default/a": workload("a", "node-1")}, [], ["default/b", "default/c"]
    )
    assert [w.name for w in view.workloads()] == ["a"]
    dump = view.dump()
    assert dump["Workload"]["default/a"]["serviceAccount"] == "sa-a"


def test_a_bare_runtime_container_is_named_by_its_cni_container_id():
    view = synced_view()
    assert view.container_workload("default-a") == ("default", "a")
    assert view.container_workload("default-zz") is None
    assert view.container_workload("a") is None


GOOD = {"default/a": workload("a", "node-1")}


@pytest.mark.parametrize(
    ("type_url", "resources", "error"),
    [
        (TRUST_BUNDLE_TYPE, {}, "mesh config without a trust bundle"),
        (
            WORKLOAD_TYPE,
            {**GOOD, "default/x": mesh_pb2.Service(name="x")},
            "a Service where a Workload",
        ),
        (
            WORKLOAD_TYPE,
            {**GOOD, "default/x": mesh_pb2.Workload(name="x", namespace="default", node="node-1")},
            "workload default/x has no service_account",
        ),
        (
            WORKLOAD_TYPE,
            {**GOOD, "default/x": mesh_pb2.Workload()},
            "no namespace, name, node, service",
        ),
        ("type.googleapis.com/weir.v1.Unknown", GOOD, "unknown resource type"),
    ],
    ids=["no-bundle", "wrong-type", "no-service-account", "empty-workload", "unknown-type"],
)
def test_a_push_with_an_unusable_resource_changes_nothing(type_url, resources, error):
    view = synced_view()
    before = view.dump()
    with pytest.raises(InvalidInputError, match=error):
        view.apply(type_url, resources, list(resources), [])
    assert view.dump() == before
