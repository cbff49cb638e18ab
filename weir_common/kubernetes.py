"""Which Kubernetes pods are in the mesh: one rule, shared by the control plane and the agent.

The control plane decides membership when it builds workloads; the node
agent applies the same rule to tell "not in the mesh" (let the pod start
uncaptured) from "in the mesh, but the control plane's push has not arrived
yet" (fail the CNI ADD as retryable). Both read the objects as the API
server returns them (plain dicts, camelCase), so the rule cannot drift
between them.
"""

from collections.abc import Mapping
from typing import Any, Final

# On a Namespace: its pods are in the mesh. On a Pod: "disabled" keeps that pod out.
MESH_LABEL: Final = "weir.dev/mesh"
MESH_ENABLED: Final = "enabled"
MESH_DISABLED: Final = "disabled"
# Pods that have ended hold no sockets worth capturing, and their IPs are reused.
FINISHED_PHASES: Final = frozenset({"Succeeded", "Failed"})


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels if isinstance(labels, Mapping) else {}


def namespace_in_mesh(namespace: Mapping[str, Any] | None) -> bool:
    return namespace is not None and _labels(namespace).get(MESH_LABEL) == MESH_ENABLED


def outside_mesh(pod: Mapping[str, Any], namespace: Mapping[str, Any] | None) -> str | None:
    """Why `pod` is not in the mesh, or None when it is.

    `namespace` is the pod's Namespace object, None when it is not known
    (deleted, or not listed yet): such a pod is out.
    """
    spec = pod.get("spec") or {}
    if not namespace_in_mesh(namespace):
        return f"namespace is not labeled {MESH_LABEL}={MESH_ENABLED}"
    if _labels(pod).get(MESH_LABEL) == MESH_DISABLED:
        return f"pod is labeled {MESH_LABEL}={MESH_DISABLED}"
    if spec.get("hostNetwork"):
        return "pod uses the host network"
    if not spec.get("nodeName"):
        return "pod is not scheduled yet"
    phase = (pod.get("status") or {}).get("phase")
    if phase in FINISHED_PHASES:
        return f"pod has finished ({phase})"
    return None
