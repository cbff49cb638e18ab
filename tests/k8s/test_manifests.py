"""deploy/: rendered by kubectl's kustomize, validated strictly, held to the house rules, admitted.

Every variant (the base that `kubectl apply -k deploy/` installs and each
overlay) is rendered with the cached kubectl and validated object by object
with kubernetes-validate against two Kubernetes versions, unknown fields
failing. The policy checks read the rendered objects (privileges, host
paths, tolerations) and the RBAC sources (a why-comment for every verb).
The sample policies are checked against the CRDs' own schemas here, and on
a real API server at the end, with invalid ones refused at admission.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from testbed.k8s_cluster.cluster import Cluster, ensure_binaries

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
EXAMPLES = DEPLOY / "examples"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
VARIANTS = ["base", *OVERLAYS]
# The newest two minor versions both kubernetes-validate and the test cluster (v1.34) know.
KUBERNETES_VERSIONS = ("1.33", "1.34")

NAMESPACE = "weir-system"
CRDS = (
    "authorizationpolicies.security.weir.dev",
    "peerauthentications.security.weir.dev",
)

# Containers allowed to run privileged: true, each with its reason. None: capabilities suffice.
PRIVILEGED_EXCEPTIONS: dict[str, str] = {}

# The only host paths any variant mounts, and who may mount them.
HOST_PATHS = {
    "weir-agent": {
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/run/weir",
        "/var/run/netns",
        "/var/lib/weir",
        "/run/xtables.lock",
        "/sys/fs/bpf",  # overlays ebpf and auto only
        "/sys/fs/cgroup",  # overlays ebpf and auto only: the cgroup v2 root, read-only
        "/lib/modules",  # overlays ebpf and auto only: kernel headers for bcc, read-only
        "/usr/src",  # overlays ebpf and auto only: kernel headers for bcc, read-only
        "/var/lib/rancher/k3s/agent/etc/cni/net.d",  # overlay k3s
        "/var/lib/rancher/k3s/data/current/bin",  # overlay k3s
        "/home/kubernetes/bin",  # overlay gke
    },
    "weir-proxy": {"/var/run/weir"},
}

# Capabilities each container may add (deploy/README.md says why each is needed).
CAPABILITIES = {
    "weir-controlplane": set(),
    "weir-agent": {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE", "CHOWN"},
    "weir-proxy": {"NET_ADMIN", "SYS_ADMIN", "SETUID", "SETGID", "SETPCAP"},
}

# Every API permission granted, as (role, apiGroup, resource, resourceName, verb);
# a grant added or widened must be reviewed here as well.
GRANTS = {
    ("ClusterRole/weir-controlplane", "", "pods", "*", "list"),
    ("ClusterRole/weir-controlplane", "", "pods", "*", "watch"),
    ("ClusterRole/weir-controlplane", "", "pods", "*", "get"),
    ("ClusterRole/weir-controlplane", "", "namespaces", "*", "list"),
    ("ClusterRole/weir-controlplane", "", "namespaces", "*", "watch"),
    ("ClusterRole/weir-controlplane", "", "services", "*", "list"),
    ("ClusterRole/weir-controlplane", "", "services", "*", "watch"),
    ("ClusterRole/weir-controlplane", "discovery.k8s.io", "endpointslices", "*", "list"),
    ("ClusterRole/weir-controlplane", "discovery.k8s.io", "endpointslices", "*", "watch"),
    ("ClusterRole/weir-controlplane", "security.weir.dev", "authorizationpolicies", "*", "list"),
    ("ClusterRole/weir-controlplane", "security.weir.dev", "authorizationpolicies", "*", "watch"),
    ("ClusterRole/weir-controlplane", "security.weir.dev", "peerauthentications", "*", "list"),
    ("ClusterRole/weir-controlplane", "security.weir.dev", "peerauthentications", "*", "watch"),
    ("ClusterRole/weir-controlplane", "authentication.k8s.io", "tokenreviews", "*", "create"),
    ("Role/weir-system/weir-controlplane-ca", "", "secrets", "weir-ca", "get"),
    ("Role/weir-system/weir-controlplane-ca", "", "secrets", "*", "create"),
    ("Role/weir-system/weir-controlplane-ca", "", "configmaps", "weir-ca-root", "get"),
    ("Role/weir-system/weir-controlplane-ca", "", "configmaps", "weir-ca-root", "update"),
    ("Role/weir-system/weir-controlplane-ca", "", "configmaps", "*", "create"),
    ("ClusterRole/weir-agent", "", "pods", "*", "list"),
    ("ClusterRole/weir-agent", "", "pods", "*", "watch"),
    ("ClusterRole/weir-agent", "", "namespaces", "*", "list"),
    ("ClusterRole/weir-agent", "", "namespaces", "*", "watch"),
    # At shutdown: its own pod, DaemonSet and namespace (uninstall or upgrade).
    ("ClusterRole/weir-agent", "", "pods", "*", "get"),
    ("ClusterRole/weir-agent", "", "namespaces", "*", "get"),
    ("ClusterRole/weir-agent", "apps", "daemonsets", "*", "get"),
}
# Which ServiceAccount each role is bound to; the proxy is bound to nothing.
BINDINGS = {
    "ClusterRole/weir-controlplane": "weir-system/weir-controlplane",
    "Role/weir-system/weir-controlplane-ca": "weir-system/weir-controlplane",
    "ClusterRole/weir-agent": "weir-system/weir-agent",
}

Object = dict[str, Any]


# -- rendering ---------------------------------------------------------------


@cache
def _kubectl() -> Path:
    return ensure_binaries() / "kubectl"


@cache
def _render_text(variant: str) -> str:
    directory = DEPLOY if variant == "base" else DEPLOY / "overlays" / variant
    done = subprocess.run(
        [str(_kubectl()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory}: {done.stderr}"
    return done.stdout


def _render(variant: str) -> list[Object]:
    return [doc for doc in yaml.safe_load_all(_render_text(variant)) if doc]


def _one(objects: list[Object], kind: str, name: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_specs(objects: list[Object]) -> Iterator[tuple[str, Object]]:
    for o in objects:
        if o["kind"] in ("Deployment", "DaemonSet"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def _containers(pod: Object) -> list[Object]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_every_overlay_is_checked() -> None:
    # An overlay added without a kustomization would be silently skipped.
    assert OVERLAYS == ["auto", "ebpf", "gke", "k3s", "trust-domain"]
    for name in OVERLAYS:
        overlay = yaml.safe_load((DEPLOY / "overlays" / name / "kustomization.yaml").read_text())
        assert overlay["resources"] == ["../../base"], name
        assert overlay["components"] == [f"../../components/{name}"], name


def test_components_combine(tmp_path: Path) -> None:
    # Overlays are one component each; a cluster needing several composes them.
    def rel(path: Path) -> str:
        return os.path.relpath(path, tmp_path)

    components = ["k3s", "ebpf", "trust-domain"]
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(DEPLOY / "base")],
                "components": [rel(DEPLOY / "components" / c) for c in components],
            }
        )
    )
    done = subprocess.run(
        [str(_kubectl()), "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    agent = _one(objects, "DaemonSet", "weir-agent")["spec"]["template"]["spec"]
    assert "--redirect-mode=ebpf" in agent["containers"][0]["args"]
    paths = {v["hostPath"]["path"] for v in agent["volumes"] if "hostPath" in v}
    assert {"/sys/fs/bpf", "/var/lib/rancher/k3s/agent/etc/cni/net.d"} <= paths
    controlplane = _one(objects, "Deployment", "weir-controlplane")["spec"]["template"]["spec"]
    assert "--trust-domain=example.org" in controlplane["containers"][0]["args"]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)


def test_base_matches_golden(golden: Callable[[str, str], None]) -> None:
    golden("deploy-base.yaml", _render_text("base"))


# -- schema validation -------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates_strictly(variant: str, version: str) -> None:
    objects = _render(variant)
    assert len(objects) >= 17
    for obj in objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(
                f"{variant}: {what} invalid for Kubernetes {version} at {path}: {e.message}"
            )


def test_strict_validation_refuses_an_unknown_field() -> None:
    # Proves the validation above can fail: a misspelled field is an error, not ignored.
    agent = copy.deepcopy(_one(_render("base"), "DaemonSet", "weir-agent"))
    agent["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(agent, KUBERNETES_VERSIONS[-1], strict=True)


def _schema_nodes(schema: Object, path: str = "") -> Iterator[tuple[str, Object]]:
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _schema_nodes(sub, f"{path}.{key}")
    if "items" in schema:
        yield from _schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _schema_nodes(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("crd", CRDS)
def test_crd_schemas_are_structural_and_bounded(crd: str) -> None:
    obj = _one(_render("base"), "CustomResourceDefinition", crd)
    assert obj["spec"]["scope"] == "Namespaced"
    (version,) = obj["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] and version["storage"]
    assert version["additionalPrinterColumns"]
    for path, node in _schema_nodes(version["schema"]["openAPIV3Schema"]):
        assert "type" in node, f"{crd}: {path or 'root'} has no type (not structural)"
        assert "x-kubernetes-preserve-unknown-fields" not in node, f"{crd}: {path}"
        if node["type"] == "array":
            assert "maxItems" in node, f"{crd}: {path} is unbounded"
        if node["type"] == "string" and path.startswith(".spec"):
            assert "maxLength" in node or "enum" in node, f"{crd}: {path} is unbounded"
        if node["type"] == "object" and path.startswith(".spec") and "properties" not in node:
            assert "maxProperties" in node, f"{crd}: {path} is unbounded"


def _crd_schema(kind: str) -> Object:
    """The CRD's schema as JSON Schema, with unknown fields refused (as kubectl's strict mode)."""
    crd = next(
        o
        for o in _render("base")
        if o["kind"] == "CustomResourceDefinition" and o["spec"]["names"]["kind"] == kind
    )
    schema: Object = copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    for _path, node in _schema_nodes(schema):
        if "properties" in node:
            node["additionalProperties"] = False
    return schema


def _examples() -> list[Object]:
    return [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_examples_match_the_crd_schemas() -> None:
    examples = _examples()
    assert {e["kind"] for e in examples} == {"AuthorizationPolicy", "PeerAuthentication"}
    for example in examples:
        assert example["apiVersion"] == "security.weir.dev/v1alpha1"
        jsonschema.validate(example, _crd_schema(example["kind"]))


POLICY: Object = {
    "apiVersion": "security.weir.dev/v1alpha1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "bad", "namespace": "shop"},
    "spec": {
        "selector": {"app": "db"},
        "action": "ALLOW",
        "rules": [
            {
                "sourcePrincipals": ["spiffe://cluster.local/ns/shop/sa/server"],
                "sourceIpBlocks": ["10.244.0.0/16"],
                "destinationPorts": [5432],
            }
        ],
    },
}
PEER_AUTHENTICATION: Object = {
    "apiVersion": "security.weir.dev/v1alpha1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "bad", "namespace": "shop"},
    "spec": {"mode": "STRICT"},
}


def _set(obj: Object, path: str, value: object) -> Object:
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return out


def _without(obj: Object, path: str) -> Object:
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[last]
    return out


# name -> (object, the field the refusal must name). CEL rules (CIDRs,
# selector keys) are checked only by the API server, so those cases are
# marked server-only.
INVALID: dict[str, tuple[Object, str, bool]] = {
    "bad action": (_set(POLICY, "spec.action", "PERMIT"), "spec.action", False),
    "port 70000": (
        _set(POLICY, "spec.rules.0.destinationPorts", [70000]),
        "spec.rules[0].destinationPorts[0]",
        False,
    ),
    "port 0": (
        _set(POLICY, "spec.rules.0.destinationPorts", [0]),
        "spec.rules[0].destinationPorts[0]",
        False,
    ),
    "port as text": (
        _set(POLICY, "spec.rules.0.destinationPorts", ["5432"]),
        "spec.rules[0].destinationPorts[0]",
        False,
    ),
    "principal not a SPIFFE ID": (
        _set(POLICY, "spec.rules.0.sourcePrincipals", ["cluster.local/ns/shop/sa/server"]),
        "spec.rules[0].sourcePrincipals[0]",
        False,
    ),
    "unknown field": (_set(POLICY, "spec.rules.0.sourcePorts", [80]), "sourcePorts", False),
    "empty rule": (_set(POLICY, "spec.rules", [{}]), "spec.rules[0]", False),
    "no action": (_without(POLICY, "spec.action"), "spec.action", False),
    "bad label value": (
        _set(POLICY, "spec.selector", {"app": "no spaces"}),
        "spec.selector",
        False,
    ),
    "too many principals": (
        _set(
            POLICY,
            "spec.rules.0.sourcePrincipals",
            [f"spiffe://cluster.local/ns/shop/sa/s{i}" for i in range(65)],
        ),
        "spec.rules[0].sourcePrincipals",
        False,
    ),
    "bad mode": (_set(PEER_AUTHENTICATION, "spec.mode", "OFF"), "spec.mode", False),
    "no mode": (_without(PEER_AUTHENTICATION, "spec.mode"), "spec.mode", False),
    "not a CIDR": (
        _set(POLICY, "spec.rules.0.sourceIpBlocks", ["10.244.0.0/33"]),
        "spec.rules[0].sourceIpBlocks[0]",
        True,
    ),
    "CIDR with host bits": (
        _set(POLICY, "spec.rules.0.sourceIpBlocks", ["10.244.0.1/16"]),
        "spec.rules[0].sourceIpBlocks[0]",
        True,
    ),
    "bad selector key": (_set(POLICY, "spec.selector", {"a b": "db"}), "spec.selector", True),
}


def _json_path(error: jsonschema.ValidationError) -> str:
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    if error.validator == "required":
        # A missing field is reported at its parent; name the field itself.
        missing = [f for f in error.validator_value if f not in error.instance]
        text += f".{missing[0]}"
    return text.lstrip(".")


@pytest.mark.parametrize(
    "case", [name for name, (_obj, _field, server_only) in INVALID.items() if not server_only]
)
def test_crd_schemas_refuse_invalid_objects(case: str) -> None:
    obj, field, _server_only = INVALID[case]
    with pytest.raises(jsonschema.ValidationError) as refused:
        jsonschema.validate(obj, _crd_schema(obj["kind"]))
    where = f"{_json_path(refused.value)} {refused.value.message}"
    assert field in where, where


# -- house rules -------------------------------------------------------------


def _verb_lines(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, verb, the comment block just above it) for each block-style verb."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip() != "verbs:":
            continue
        indent = len(line) - len(line.lstrip())
        comment: list[str] = []
        for number in range(index + 1, len(lines)):
            item = lines[number]
            stripped = item.strip()
            if stripped and len(item) - len(item.lstrip()) <= indent:
                break
            if stripped.startswith("#"):
                comment.append(stripped.lstrip("# "))
            elif stripped.startswith("- "):
                yield number + 1, stripped[2:].split("#")[0].strip(), " ".join(comment)
                comment = []


def _rbac_sources() -> list[Path]:
    return [
        path
        for path in sorted(DEPLOY.rglob("*.yaml"))
        if re.search(r"^kind: (Cluster)?Role$", path.read_text(), re.MULTILINE)
    ]


def test_every_rbac_verb_says_why() -> None:
    sources = _rbac_sources()
    assert sources, "no Role or ClusterRole found in deploy/"
    for path in sources:
        text = path.read_text()
        commented = list(_verb_lines(text))
        for line, verb, why in commented:
            assert len(why.split()) >= 3, f"{path}:{line}: verb {verb!r} has no why-comment above"
        # Flow-style verbs ([get, list]) would escape the line scan above.
        parsed = [
            verb
            for doc in yaml.safe_load_all(text)
            if doc and doc["kind"] in ("Role", "ClusterRole")
            for rule in doc["rules"]
            for verb in rule["verbs"]
        ]
        assert [v for _line, v, _why in commented] == parsed, f"{path}: verbs not one per line"


def _grants(objects: list[Object]) -> set[tuple[str, str, str, str, str]]:
    grants = set()
    for o in objects:
        if o["kind"] not in ("Role", "ClusterRole"):
            continue
        meta = o["metadata"]
        role = (
            f"Role/{meta['namespace']}/{meta['name']}"
            if o["kind"] == "Role"
            else f"ClusterRole/{meta['name']}"
        )
        for rule in o["rules"]:
            assert "nonResourceURLs" not in rule, role
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for name in rule.get("resourceNames", ["*"]):
                        for verb in rule["verbs"]:
                            grants.add((role, group, resource, name, verb))
    return grants


def _bindings(objects: list[Object]) -> dict[str, str]:
    bound = {}
    for o in objects:
        if o["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = o["roleRef"]
        role = (
            f"Role/{o['metadata']['namespace']}/{ref['name']}"
            if ref["kind"] == "Role"
            else f"ClusterRole/{ref['name']}"
        )
        (subject,) = o["subjects"]
        assert subject["kind"] == "ServiceAccount", role
        assert role not in bound, f"{role} bound twice"
        bound[role] = f"{subject['namespace']}/{subject['name']}"
    return bound


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbac_is_exactly_the_reviewed_grants(variant: str) -> None:
    objects = _render(variant)
    assert _grants(objects) == GRANTS
    assert _bindings(objects) == BINDINGS
    for wildcard in ("*",):
        assert all(wildcard not in (g[1], g[2], g[4]) for g in _grants(objects))


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_container_is_privileged_and_capabilities_are_listed(variant: str) -> None:
    for owner, pod in _pod_specs(_render(variant)):
        for container in _containers(pod):
            where = f"{variant}: {owner}/{container['name']}"
            context = container.get("securityContext", {})
            if context.get("privileged"):
                assert where.split(": ")[1] in PRIVILEGED_EXCEPTIONS, f"{where} is privileged"
            capabilities = context.get("capabilities", {})
            assert capabilities.get("drop") == ["ALL"], f"{where} keeps default capabilities"
            assert set(capabilities.get("add", [])) <= CAPABILITIES[owner], where


@pytest.mark.parametrize("variant", VARIANTS)
def test_host_paths_are_allowlisted(variant: str) -> None:
    for owner, pod in _pod_specs(_render(variant)):
        used = {v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}
        assert used <= HOST_PATHS.get(owner, set()), f"{variant}: {owner} mounts {used}"
        if owner == "weir-controlplane":
            for host in ("hostNetwork", "hostPID", "hostIPC"):
                assert not pod.get(host), f"{variant}: the control plane uses {host}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_daemonsets_run_on_every_node_as_node_critical(variant: str) -> None:
    daemonsets = [o for o in _render(variant) if o["kind"] == "DaemonSet"]
    assert sorted(d["metadata"]["name"] for d in daemonsets) == ["weir-agent", "weir-proxy"]
    for ds in daemonsets:
        pod = ds["spec"]["template"]["spec"]
        name = ds["metadata"]["name"]
        # A toleration with operator Exists and no key or effect tolerates every taint.
        assert {"operator": "Exists"} in pod["tolerations"], name
        assert pod["priorityClassName"] == "system-node-critical", name
        assert pod["hostNetwork"] is True, name
        assert pod["dnsPolicy"] == "ClusterFirstWithHostNet", name
        (container,) = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz/ready", name
        assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in (
            container["env"]
        ), name


def test_rolling_updates_keep_a_proxy_on_every_node() -> None:
    objects = _render("base")
    agent = _one(objects, "DaemonSet", "weir-agent")["spec"]["updateStrategy"]
    proxy = _one(objects, "DaemonSet", "weir-proxy")["spec"]["updateStrategy"]
    assert agent == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert proxy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = _one(objects, "DaemonSet", "weir-proxy")["spec"]["template"]["spec"]
    args = dict(
        a.removeprefix("--").split("=", 1) for a in pod["containers"][0]["args"] if "=" in a
    )
    stopping = ("await-successor-seconds", "handover-seconds", "drain-seconds")
    # The kubelet's SIGKILL must not cut the handover or the drain short.
    assert pod["terminationGracePeriodSeconds"] > sum(float(args[a]) for a in stopping)
    # The old proxy's SIGTERM waits for the successor itself; a preStop pause adds nothing.
    assert "lifecycle" not in pod["containers"][0]


def _token_volume(pod: Object) -> Object:
    (volume,) = [v for v in pod["volumes"] if v["name"] == "token"]
    return dict(volume["projected"])


def test_node_components_present_an_audience_weir_token() -> None:
    objects = _render("base")
    agent = _one(objects, "DaemonSet", "weir-agent")["spec"]["template"]["spec"]
    proxy = _one(objects, "DaemonSet", "weir-proxy")["spec"]["template"]["spec"]
    source = {
        "serviceAccountToken": {"audience": "weir", "expirationSeconds": 3600, "path": "token"}
    }
    assert _token_volume(agent) == {"defaultMode": 0o400, "sources": [source]}
    # UID 1337 re-reads the rotated token through its group after dropping root.
    assert _token_volume(proxy) == {"defaultMode": 0o440, "sources": [source]}
    assert proxy["securityContext"]["fsGroup"] == 1337
    for pod in (agent, proxy):
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["token"] == "/var/run/secrets/weir"
        assert mounts["ca-root"] == "/etc/weir/ca"
        (ca,) = [v for v in pod["volumes"] if v["name"] == "ca-root"]
        assert ca["configMap"] == {"name": "weir-ca-root"}
    assert agent["automountServiceAccountToken"] is True
    assert agent["serviceAccountName"] == "weir-agent"
    assert proxy["automountServiceAccountToken"] is False
    assert proxy["serviceAccountName"] == "weir-proxy"


def test_control_plane_runs_without_privileges() -> None:
    objects = _render("base")
    deployment = _one(objects, "Deployment", "weir-controlplane")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "podAntiAffinity" in pod["affinity"]
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
    assert {"name": "health", "containerPort": 15021, "protocol": "TCP"} in container["ports"]
    service = _one(objects, "Service", "weir-controlplane")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("grpc", 15012)]
    budget = _one(objects, "PodDisruptionBudget", "weir-controlplane")
    assert budget["spec"]["minAvailable"] == 1


def test_weir_system_is_not_in_the_mesh() -> None:
    namespace = _one(_render("base"), "Namespace", NAMESPACE)
    assert "weir.dev/mesh" not in namespace["metadata"].get("labels", {})


def _documented_command_lines() -> dict[str, list[str]]:
    """docs/kubernetes.md "Command lines", as argv lists with --flag=value joined."""
    text = (REPO / "docs" / "kubernetes.md").read_text()
    section = text.split("## Command lines", 1)[1]
    block = section.split("```", 2)[1].replace("\\\n", " ")
    commands = {}
    for line in block.splitlines():
        words = shlex.split(line)
        if not words:
            continue
        assert words[0] == "weir", line
        argv: list[str] = []
        for word in words[1:]:
            if (
                argv
                and argv[-1].startswith("--")
                and "=" not in argv[-1]
                and not word.startswith("--")
            ):
                argv[-1] = f"{argv[-1]}={word}"
            else:
                argv.append(word)
        commands[words[1]] = argv
    return commands


def test_command_lines_are_the_documented_ones() -> None:
    objects = _render("base")
    running = {
        "controlplane": _one(objects, "Deployment", "weir-controlplane"),
        "agent": _one(objects, "DaemonSet", "weir-agent"),
        "proxy": _one(objects, "DaemonSet", "weir-proxy"),
    }
    documented = _documented_command_lines()
    assert sorted(documented) == sorted(running)
    for name, workload in running.items():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert "command" not in container, "the image's entrypoint is /opt/weir/bin/weir"
        assert container["image"] == "weir.test/weir:dev"
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert container["args"] == documented[name], name


# -- a real API server -------------------------------------------------------


REAL_KINDS = (
    "CustomResourceDefinition",
    "Namespace",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)


@pytest.fixture(scope="module")
def with_crds(k8s_cluster: Cluster) -> Cluster:
    """The cluster with the CRDs, weir-system and the namespace guard created for real.

    The dry runs need the first two (a custom resource or a namespaced object
    is checked against what exists); the guard is what one test exercises.
    """
    cluster = k8s_cluster
    real = [o for o in _render("base") if o["kind"] in REAL_KINDS]
    applied = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(real))
    assert applied.returncode == 0, applied.stderr
    established = cluster.kubectl(
        "wait", "--for=condition=Established", *(f"crd/{c}" for c in CRDS), "--timeout=60s"
    )
    assert established.returncode == 0, established.stderr
    shop = cluster.kubectl("create", "namespace", "shop")
    assert shop.returncode == 0, shop.stderr
    return cluster


@pytest.mark.k8s
@pytest.mark.netns
@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", VARIANTS)
def test_api_server_admits_every_variant(with_crds: Cluster, variant: str) -> None:
    directory = DEPLOY if variant == "base" else DEPLOY / "overlays" / variant
    dry = with_crds.kubectl("apply", "--dry-run=server", "-k", str(directory))
    assert dry.returncode == 0, f"{variant}: {dry.stderr}"
    assert "daemonset.apps/weir-proxy created (server dry run)" in dry.stdout, dry.stdout


@pytest.mark.k8s
@pytest.mark.netns
@pytest.mark.timeout(600)
def test_api_server_admits_the_examples(with_crds: Cluster) -> None:
    dry = with_crds.kubectl("apply", "--dry-run=server", "-f", str(EXAMPLES))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("(server dry run)") == len(_examples()), dry.stdout


@pytest.mark.k8s
@pytest.mark.netns
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(INVALID))
def test_api_server_refuses_invalid_policies(with_crds: Cluster, case: str) -> None:
    obj, field, _server_only = INVALID[case]
    dry = with_crds.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(obj))
    assert dry.returncode != 0, f"{case}: admitted: {dry.stdout}"
    assert field in dry.stderr, dry.stderr


def _label(cluster: Cluster, namespace: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "label", "--dry-run=server", "namespace", namespace, "weir.dev/mesh=enabled"
    )


@pytest.mark.k8s
@pytest.mark.netns
@pytest.mark.timeout(600)
def test_system_namespaces_cannot_join_the_mesh(with_crds: Cluster) -> None:
    # A new admission policy is enforced once the API server has compiled it: within seconds.
    deadline = time.monotonic() + 30
    while (labeled := _label(with_crds, "kube-system")).returncode == 0:
        assert time.monotonic() < deadline, "kube-system could still be labeled after 30 s"
        time.sleep(0.5)
    assert "never in the mesh" in labeled.stderr, labeled.stderr
    refused = _label(with_crds, NAMESPACE)
    assert refused.returncode != 0, refused.stdout
    assert "never in the mesh" in refused.stderr, refused.stderr
    shop = _label(with_crds, "shop")
    assert shop.returncode == 0, shop.stderr
