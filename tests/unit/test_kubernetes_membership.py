"""The mesh membership rule both the control plane and the agent apply."""

from typing import Any

import pytest

from weir_common.kubernetes import namespace_in_mesh, outside_mesh

MESHED_NS = {"metadata": {"name": "shop", "labels": {"weir.dev/mesh": "enabled"}}}


def _pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", **spec},
        "status": {"phase": "Running"},
    }


def test_a_scheduled_pod_in_a_labeled_namespace_is_in() -> None:
    assert outside_mesh(_pod(), MESHED_NS) is None


@pytest.mark.parametrize(
    ("namespace", "why"),
    [
        (None, "namespace is not labeled weir.dev/mesh=enabled"),
        ({"metadata": {"name": "shop"}}, "namespace is not labeled"),
        ({"metadata": {"labels": {"weir.dev/mesh": "disabled"}}}, "namespace is not labeled"),
        ({"metadata": {"labels": {"weir.dev/mesh": "Enabled"}}}, "namespace is not labeled"),
    ],
)
def test_namespaces_opt_in_with_exactly_the_enabled_label(
    namespace: dict[str, Any] | None, why: str
) -> None:
    reason = outside_mesh(_pod(), namespace)
    assert reason is not None and reason.startswith(why)
    assert not namespace_in_mesh(namespace)


def test_a_pod_opts_out_with_the_disabled_label() -> None:
    pod = _pod()
    pod["metadata"]["labels"]["weir.dev/mesh"] = "disabled"
    assert outside_mesh(pod, MESHED_NS) == "pod is labeled weir.dev/mesh=disabled"


def test_host_network_unscheduled_and_finished_pods_are_out() -> None:
    assert outside_mesh(_pod(hostNetwork=True), MESHED_NS) == "pod uses the host network"
    unscheduled = _pod()
    del unscheduled["spec"]["nodeName"]
    assert outside_mesh(unscheduled, MESHED_NS) == "pod is not scheduled yet"
    for phase in ("Succeeded", "Failed"):
        done = _pod()
        done["status"]["phase"] = phase
        assert outside_mesh(done, MESHED_NS) == f"pod has finished ({phase})"
    pending = _pod()
    pending["status"]["phase"] = "Pending"
    assert outside_mesh(pending, MESHED_NS) is None
