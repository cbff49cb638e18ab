"""The reconcile loop's decision for one pod: membership rule x mesh view x annotations x record."""

from __future__ import annotations

from typing import Any

from node_agent.enrollment.enroller import MeshIntent
from node_agent.enrollment.registry import PodRecord
from node_agent.kubernetes.decisions import Enroll, Leave, Unenroll, decide
from node_agent.redirect.config import CaptureConfig

MESHED_NS = {"metadata": {"name": "shop", "labels": {"weir.dev/mesh": "enabled"}}}
PLAIN_NS = {"metadata": {"name": "shop"}}
INTENT = MeshIntent(service_account="web")


def pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> Any:
    return {
        "metadata": {
            "namespace": "shop",
            "name": "web",
            "uid": "u1",
            "labels": labels or {},
            "annotations": annotations or {},
        },
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running"},
    }


def record(*, enrolled: bool = True, capture: CaptureConfig | None = None) -> PodRecord:
    return PodRecord(
        uid="u1",
        namespace="shop",
        name="web",
        service_account="web",
        container_id="sandbox-1",
        netns="/var/run/netns/cni-1",
        netns_inode=1,
        ips=("10.244.1.5/32",),
        capture=capture or CaptureConfig(),
        mode="iptables-nft",
        enrolled=enrolled,
    )


def test_meshed_pod_not_enrolled_is_enrolled() -> None:
    assert decide(pod(), MESHED_NS, INTENT, None) == Enroll()


def test_enrolled_pod_in_the_mesh_stays() -> None:
    assert decide(pod(), MESHED_NS, INTENT, record()) == Leave("captured")
    assert decide(pod(), MESHED_NS, INTENT, record(enrolled=False)) == Leave("enrolling")


def test_leaving_the_mesh_unenrolls_for_each_reason() -> None:
    label_removed = decide(pod(), PLAIN_NS, INTENT, record())
    assert label_removed == Unenroll(
        "sandbox-1", "left the mesh: namespace is not labeled weir.dev/mesh=enabled"
    )
    opted_out = decide(pod({"weir.dev/mesh": "disabled"}), MESHED_NS, INTENT, record())
    assert opted_out == Unenroll(
        "sandbox-1", "left the mesh: pod is labeled weir.dev/mesh=disabled"
    )
    namespace_gone = decide(pod(), None, INTENT, record())
    assert isinstance(namespace_gone, Unenroll)
    not_captured = decide(pod(), MESHED_NS, "shop/web is configured as not captured", record())
    assert not_captured == Unenroll(
        "sandbox-1", "left the mesh: shop/web is configured as not captured"
    )


def test_pods_outside_the_mesh_are_left_alone() -> None:
    assert decide(pod(), PLAIN_NS, INTENT, None) == Leave(
        "not in the mesh: namespace is not labeled weir.dev/mesh=enabled"
    )
    unknown = decide(pod(), MESHED_NS, "shop/web is not a workload of the mesh config", None)
    assert unknown == Leave("not in the mesh: shop/web is not a workload of the mesh config")


def test_a_bad_annotation_keeps_a_pod_out_and_an_enrolled_pod_as_it_is() -> None:
    bad = pod(annotations={"weir.dev/exclude-outbound-ports": "ssh"})
    left_out = decide(bad, MESHED_NS, INTENT, None)
    assert isinstance(left_out, Leave)
    assert left_out.status.startswith("not enrolled: annotation weir.dev/exclude-outbound-ports")
    kept = decide(bad, MESHED_NS, INTENT, record())
    assert isinstance(kept, Leave)
    assert kept.status.startswith("captured; annotation weir.dev/exclude-outbound-ports")


def test_changed_annotations_are_reported_not_applied_to_a_running_pod() -> None:
    annotated = pod(annotations={"weir.dev/exclude-outbound-ports": "22"})
    assert decide(annotated, MESHED_NS, INTENT, None) == Enroll()
    changed = decide(annotated, MESHED_NS, INTENT, record())
    assert isinstance(changed, Leave)
    assert "annotations changed since enrollment" in changed.status
    same = record(capture=CaptureConfig(exclude_outbound_ports=(22,)))
    assert decide(annotated, MESHED_NS, INTENT, same) == Leave("captured")
