"""vagrant/: the Vagrantfile validates, its provisioning scripts parse and pass
shellcheck, and the sample app is valid (Kubernetes 1.34's schemas, the CRD
deploy/ installs) and is what the walk-through says it is.

Nothing is booted: `vagrant validate --ignore-provider` needs neither a
provider nor a box nor the network (a provider block's own settings are
therefore not checked). Each run gets its own VAGRANT_HOME and dotfile path,
so nothing is left in ~ or in vagrant/.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controlplane.kubernetes.translate import ClusterObjects, translate
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.kubernetes import namespace_in_mesh

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
SCRIPTS = sorted((VAGRANT_DIR / "provision").glob("*.sh"))
SAMPLE_APP = VAGRANT_DIR / "sample-app"
AUTHORIZATION_POLICY_CRD = ROOT / "deploy" / "base" / "crds" / "authorizationpolicies.yaml"
KUBERNETES_VERSION = "1.34"
VALIDATED = "Vagrantfile validated successfully."


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make debian-packages` installs it"
    return path


def validate(project: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(scratch),
        "VAGRANT_HOME": str(scratch / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(scratch / "dotfile"),
        # No version check against HashiCorp's servers.
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    return subprocess.run(
        [tool("vagrant"), "validate", "--ignore-provider", "--no-color", "--no-tty"],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_vagrantfile_validates(tmp_path):
    result = validate(VAGRANT_DIR, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert VALIDATED in result.stdout
    for node in ("cp", "w1", "w2"):
        assert f"{node}: Ignoring provider config" in result.stdout
    assert not (VAGRANT_DIR / ".vagrant").exists()


# Each breakage, and what vagrant must say about it: proof that a broken
# Vagrantfile fails the check above rather than slipping through it.
BREAKAGES = {
    "misspelled setting": (
        'cp.vm.hostname = "cp"',
        'cp.vm.hostnam = "cp"',
        "The following settings shouldn't exist: hostnam",
    ),
    "missing script": (
        "provision/worker.sh",
        "provision/no-such-script.sh",
        "no-such-script.sh",
    ),
    "syntax error": ("end\nend\n", "end\n", "syntax error"),
    "bad variable": ("WORKERS = 2\n", "WORKERS = 0\n", "WORKERS must be an integer from 1 to 9"),
    "overlapping networks": (
        'POD_CIDR = "10.244.0.0/16"',
        'POD_CIDR = "192.168.0.0/16"',
        "overlaps NODE_NETWORK",
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_vagrantfile_fails_validation(tmp_path, breakage):
    # The copy keeps the layout: the Vagrantfile shares its parent directory.
    project = tmp_path / "checkout" / "vagrant"
    shutil.copytree(VAGRANT_DIR, project, ignore=shutil.ignore_patterns(".vagrant"))
    old, new, message = BREAKAGES[breakage]
    vagrantfile = project / "Vagrantfile"
    text = vagrantfile.read_text()
    assert text.endswith(old) if breakage == "syntax error" else text.count(old) == 1
    vagrantfile.write_text(text[: text.rindex(old)] + new + text[text.rindex(old) + len(old) :])

    result = validate(project, tmp_path / "scratch")

    assert result.returncode != 0
    assert VALIDATED not in result.stdout
    assert message in result.stdout + result.stderr


def test_every_provisioning_script_is_used_by_the_vagrantfile():
    names = {script.name for script in SCRIPTS}
    assert names == {"common.sh", "control-plane.sh", "flannel.sh", "worker.sh"}
    vagrantfile = (VAGRANT_DIR / "Vagrantfile").read_text()
    for name in names:
        assert f'path: "provision/{name}"' in vagrantfile


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_provisioning_script_parses(script):
    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_provisioning_script_passes_shellcheck(script):
    result = subprocess.run(
        [tool("shellcheck"), "--shell=bash", "--severity=style", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_a_broken_script(tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/usr/bin/env bash\nset -euo pipefail\nrm -rf $1/\n")
    result = subprocess.run(
        [tool("shellcheck"), "--shell=bash", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "SC2086" in result.stdout


def load(name: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all((SAMPLE_APP / name).read_text()) if doc]


def test_the_sample_app_is_valid_for_kubernetes_1_34():
    for doc in load("app.yaml"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_sample_policy_is_valid_for_the_installed_crd():
    crd = yaml.safe_load(AUTHORIZATION_POLICY_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    (policy,) = load("deny-client.yaml")
    jsonschema.validate(policy, version["schema"]["openAPIV3Schema"])


def test_the_sample_namespace_is_in_the_mesh_and_the_client_avoids_the_servers_node():
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in load("app.yaml")}
    assert set(objects) == {
        ("Namespace", "weir-demo"),
        ("ServiceAccount", "server"),
        ("ServiceAccount", "client"),
        ("Deployment", "server"),
        ("Deployment", "client"),
        ("Service", "server"),
    }
    assert namespace_in_mesh(objects["Namespace", "weir-demo"])
    for kind, name in objects:
        if kind != "Namespace":
            assert objects[kind, name]["metadata"]["namespace"] == "weir-demo"
    for app in ("server", "client"):
        pod = objects["Deployment", app]["spec"]["template"]
        assert pod["spec"]["serviceAccountName"] == app
        assert pod["metadata"]["labels"] == {"app": app}
    client = objects["Deployment", "client"]["spec"]["template"]["spec"]
    (term,) = client["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term == {
        "labelSelector": {"matchLabels": {"app": "server"}},
        "topologyKey": "kubernetes.io/hostname",
    }


def test_the_sample_policy_denies_the_client_identity_on_the_server():
    (policy,) = load("deny-client.yaml")
    assert policy["apiVersion"] == "security.weir.dev/v1alpha1"
    assert policy["kind"] == "AuthorizationPolicy"
    translation = translate(
        ClusterObjects(authorization_policies={"weir-demo/deny-client": policy}),
        trust_domain="cluster.local",
    )
    assert translation.skipped == ()
    (translated,) = translation.mesh.policies.values()
    assert translated.action == mesh_pb2.DENY
    assert dict(translated.selector) == {"app": "server"}
    (rule,) = translated.rules
    assert list(rule.source_principals) == ["spiffe://cluster.local/ns/weir-demo/sa/client"]
