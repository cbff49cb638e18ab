"""What the reconcile loop does with one pod of this node: a pure function of what it knows.

The inputs are the pod and its namespace as the API server returns them, the
mesh view's answer for the pod, and the agent's record of it (None when not
enrolled). The membership rule (weir_common.kubernetes) and the mesh view
must both say "captured" for the pod to be enrolled; either one saying no
unenrolls an enrolled pod. Annotations are read at enrollment: a change on a
running pod is reported, and applies when the pod's sandbox is re-created
(re-enrolling a live pod would cut its proxied connections).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from node_agent.enrollment.enroller import MeshIntent
from node_agent.enrollment.registry import PodRecord
from node_agent.kubernetes.annotations import capture_config
from weir_common.errors import InvalidInputError
from weir_common.kubernetes import outside_mesh


@dataclass(frozen=True)
class Enroll:
    """Find the pod's sandbox and enroll it as a CNI ADD would."""

    status: str = "enrolling"


@dataclass(frozen=True)
class Unenroll:
    container_id: str
    status: str


@dataclass(frozen=True)
class Leave:
    """Nothing to do; `status` is what the admin API shows for the pod."""

    status: str


Decision = Enroll | Unenroll | Leave


def pod_annotations(pod: Mapping[str, Any]) -> Mapping[str, str]:
    found = (pod.get("metadata") or {}).get("annotations") or {}
    return found if isinstance(found, Mapping) else {}


def decide(
    pod: Mapping[str, Any],
    namespace: Mapping[str, Any] | None,
    mesh: MeshIntent | str,
    record: PodRecord | None,
) -> Decision:
    out = outside_mesh(pod, namespace)
    if out is None and isinstance(mesh, MeshIntent):
        return _in_mesh(pod, mesh, record)
    reason = out if out is not None else str(mesh)
    if record is not None:
        return Unenroll(record.container_id, f"left the mesh: {reason}")
    return Leave(f"not in the mesh: {reason}")


def _in_mesh(pod: Mapping[str, Any], mesh: MeshIntent, record: PodRecord | None) -> Decision:
    try:
        capture = capture_config(pod_annotations(pod), mesh.capture)
    except InvalidInputError as e:
        if record is None:
            return Leave(f"not enrolled: {e.message}")
        return Leave(f"captured; {e.message} (the capture in force stays)")
    if record is None:
        return Enroll()
    if not record.enrolled:
        return Leave("enrolling")
    if record.capture != capture:
        return Leave(
            "captured; its capture annotations changed since enrollment and apply "
            "when the pod is re-created"
        )
    return Leave("captured")
