"""`weir agent --kubernetes [--kubeconfig PATH]`: which API client, and the refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from node_agent.agent.cli import kubernetes_api
from weir_common.errors import InvalidInputError

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://10.250.0.2:6443", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""


def args(kubernetes: bool, kubeconfig: Path | None) -> argparse.Namespace:
    return argparse.Namespace(kubernetes=kubernetes, kubeconfig=kubeconfig)


def test_without_kubernetes_there_is_no_client() -> None:
    assert kubernetes_api(args(False, None)) is None


def test_kubeconfig_names_the_cluster(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    api = kubernetes_api(args(True, path))
    assert api is not None
    assert api.api_client.configuration.host == "https://10.250.0.2:6443"


def test_refusals_are_specific(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInputError, match="--kubeconfig is for --kubernetes"):
        kubernetes_api(args(False, tmp_path / "kubeconfig"))
    with pytest.raises(InvalidInputError, match="cannot load Kubernetes client config from"):
        kubernetes_api(args(True, tmp_path / "absent"))
    # Outside a pod there is no in-cluster configuration.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(InvalidInputError, match="the in-cluster configuration"):
        kubernetes_api(args(True, None))
