"""YAML validation: the example loads; every bad input is a precise, all-or-nothing error."""

from pathlib import Path

import pytest
from cp_testing import MESH_YAML

from controlplane.config_file import ConfigError, parse
from weir_common._generated.weir.v1 import mesh_pb2

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mesh.yaml"


def test_example_mesh_loads():
    mesh = parse(EXAMPLE.read_text(), source="mesh.yaml")
    assert sorted(mesh.nodes) == ["node-1", "node-2"]
    assert len(mesh.workloads) == 4
    assert mesh.workloads["legacy/intruder"].mtls_mode == mesh_pb2.PERMISSIVE
    assert list(mesh.services["default/server"].service.endpoints) == ["default/server"]
    actions = {p.action for p in mesh.policies.values()}
    assert actions == {mesh_pb2.ALLOW, mesh_pb2.DENY}
    assert "token" not in repr(mesh.nodes) and "token" not in str(mesh.dump())


@pytest.mark.parametrize(
    ("old", "new", "path", "reason"),
    [
        ("trustDomain: cluster.local", "trustDomain: [unclosed", "line", "invalid YAML"),
        (
            "  - {name: client, namespace: default,",
            "  - {name: client, color: red, namespace: default,",
            "workloads[0].color",
            "unknown field",
        ),
        (
            "name: server, namespace: default, serviceAccount: server",
            "name: client, namespace: default, serviceAccount: server",
            "workloads[1]",
            "duplicate 'default/client'",
        ),
        (
            "trustDomain: cluster.local",
            "trustDomain: cluster.local\ntrustDomain: x",
            "line",
            "duplicate key 'trustDomain'",
        ),
        (
            "rules: [{sourcePrincipals",
            "rules: [{sourceIpBlocks: [10.0.0.1/8], sourcePrincipals",
            "authorizationPolicies[0].rules[0].sourceIpBlocks[0]",
            "not a valid CIDR",
        ),
        (
            "selector: {app: server}\n    action",
            "selector: {app: nothing}\n    action",
            "authorizationPolicies[0].selector",
            "selects no workload",
        ),
        (
            "node: node-2, labels: {app: server}",
            "node: node-9, labels: {app: server}",
            "workloads[1].node",
            "not declared",
        ),
        ("vips: [10.96.0.10]", "vips: [10.96.0.300]", "services[0].vips[0]", "not an IP address"),
    ],
)
def test_bad_input_is_a_precise_error(old, new, path, reason):
    assert old in MESH_YAML
    with pytest.raises(ConfigError) as failure:
        parse(MESH_YAML.replace(old, new, 1), source="mesh.yaml")
    error = failure.value
    assert error.source == "mesh.yaml"
    assert error.path.startswith(path), error.message
    assert reason in error.reason, error.message
    assert str(error).startswith(f"mesh.yaml: {error.path}: ")


def test_token_is_never_echoed():
    text = MESH_YAML.replace("token-node-1-0123456789", "short")
    with pytest.raises(ConfigError) as failure:
        parse(text, source="mesh.yaml")
    assert failure.value.path == "nodes[0].bootstrapToken"
    assert "short" not in failure.value.message
