"""Kubernetes mode without a cluster: registrations vs the API's view, --health-listen, flags."""

import asyncio
import urllib.error
import urllib.request

import grpc
import pytest
from cp_testing import running_plane

from controlplane.app import Settings
from controlplane.auth import RequestRefusedError
from controlplane.cli import main
from controlplane.kubernetes.translate import ClusterObjects, translate
from controlplane.state import MeshState
from weir_common.mesh import WORKLOAD_TYPE

pytestmark = pytest.mark.timeout(60)


def _mesh(ips=(), uid="uid-1", node="n1"):
    pod = {
        "metadata": {"name": "web", "namespace": "shop", "uid": uid, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "serviceAccountName": "web"},
        "status": {"phase": "Pending", "podIPs": [{"ip": ip} for ip in ips]},
    }
    namespace = {"metadata": {"name": "shop", "labels": {"weir.dev/mesh": "enabled"}}}
    return translate(
        ClusterObjects(namespaces={"shop": namespace}, pods={"shop/web": pod}), "cluster.local"
    ).mesh


def _served_ips(state):
    return list(state.snapshot.view(WORKLOAD_TYPE)["shop/web"].message.ips)


def test_registration_bridges_until_the_api_reports_the_ips_and_must_match_its_uid():
    state = MeshState(_mesh(), [], lambda _snapshot: None)
    with pytest.raises(RequestRefusedError) as refused:
        state.register("n1", "shop", "web", "uid-other", ["10.244.1.5"])
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "uid_mismatch",
    )
    with pytest.raises(RequestRefusedError) as refused:
        state.register("n2", "shop", "web", "uid-1", ["10.244.1.5"])
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    # At CNI ADD the kubelet has not reported the IP yet: the registration stands in.
    state.register("n1", "shop", "web", "uid-1", ["10.244.1.5"])
    assert _served_ips(state) == ["10.244.1.5"]
    # Once the API server has it, its view wins, so every replica serves the same.
    state.set_mesh(_mesh(ips=("10.244.1.9",)))
    assert _served_ips(state) == ["10.244.1.9"]
    # A new pod of the same name (new uid) drops the old pod's registration.
    state.set_mesh(_mesh(uid="uid-2"))
    assert dict(state.registrations) == {}
    assert _served_ips(state) == []


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_health_listener_serves_probes_and_metrics_only(tmp_path):
    async def scenario():
        settings = Settings(
            grpc_listen="127.0.0.1:0", http_listen=None, health_listen="127.0.0.1:0"
        )
        async with running_plane(tmp_path, settings=settings) as plane:
            paths = ("/healthz", "/healthz/ready", "/metrics", "/debug/config_dump")
            return {p: await asyncio.to_thread(_get, plane.health_port, p) for p in paths}

    assert asyncio.run(scenario()) == {
        "/healthz": 200,
        "/healthz/ready": 200,
        "/metrics": 200,
        "/debug/config_dump": 404,
    }


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--kubernetes", "--config", "x.yaml"], "not allowed with"),
        ([], "one of the arguments --config --kubernetes is required"),
        (["--config", "x.yaml", "--namespace", "weir"], "--namespace: only with --kubernetes"),
        (["--config", "x.yaml", "--token-audience", "a"], "--token-audience: only with"),
        (["--kubernetes", "--state-dir", "/tmp/x"], "no use with --kubernetes"),
        (["--kubernetes", "--node-service-account", "weir-agent"], "is not NAMESPACE/NAME"),
        (["--kubernetes", "--namespace", "Weir_System"], "is not a namespace name"),
        (["--kubernetes", "--trust-domain", "Bad Domain"], "is not a valid trust domain"),
    ],
)
def test_flags_are_checked_before_anything_starts(argv, words, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_kubernetes_mode_without_a_cluster_config_fails_clearly(tmp_path, capsys):
    missing = tmp_path / "nope.kubeconfig"
    assert main(["--kubernetes", "--kubeconfig", str(missing), "--listen", "127.0.0.1:0"]) == 1
    assert f"cannot load the Kubernetes client config from {missing}" in capsys.readouterr().err
