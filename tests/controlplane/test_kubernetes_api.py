"""Kubernetes mode against a real API server: the source, TokenReview, the CA in a Secret.

One cluster for the module (tests/k8s/conftest.py's pattern); the CRDs are
deploy/base/crds/, the ones `kubectl apply -k deploy/` installs.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from controlplane import metrics as m
from controlplane.app import ControlPlane, Settings
from controlplane.auth import RequestRefusedError
from controlplane.kubernetes.api import new_api_client
from controlplane.kubernetes.ca_store import load_or_create_root_secret
from controlplane.kubernetes.source import KubernetesSource, cluster_resources
from controlplane.kubernetes.tokenreview import (
    TokenReviewAuthenticator,
    api_read_pod,
    api_review,
)
from controlplane.mesh import MeshConfig
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import request_certificate
from testbed.k8s_cluster import config
from testbed.k8s_cluster.cluster import Cluster, leftovers, up
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.mesh import auth_metadata
from weir_common.retry import Backoff

pytestmark = [pytest.mark.netns, pytest.mark.k8s, pytest.mark.timeout(600)]

CRDS = Path(__file__).resolve().parents[2] / "deploy" / "base" / "crds"
TD = "cluster.local"
STEP = 60.0
NODE_ACCOUNTS = [("weir-system", "weir-agent"), ("weir-system", "weir-proxy")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    work = Path(tempfile.mkdtemp(prefix="wk8s-cp-test-"))
    try:
        cluster = up(work / "k8s", node_count=2)  # removes what it made if it fails
        try:
            _ok(cluster, "apply", "-f", str(CRDS))
            _ok(cluster, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
            _ok(cluster, "create", "namespace", "weir-system")
            yield cluster
        finally:
            cluster.down()
            left = leftovers(cluster)
            assert not left, f"left behind after teardown: {left}"
    finally:
        work.rmdir()


def _ok(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    done = cluster.kubectl(*args, stdin=stdin)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def _apply(cluster: Cluster, *objects: dict[str, object]) -> None:
    _ok(
        cluster,
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}),
    )


def _pod(
    name: str,
    namespace: str,
    node: str,
    *,
    service_account: str = "default",
    labels: dict[str, str] | None = None,
    command: str = "exec sleep 3600",
) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": config.TEST_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", command],
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ],
        },
    }


def _wait_for_default_account(cluster: Cluster, namespace: str) -> None:
    """The controller-manager creates it shortly after the namespace; pods need it."""
    deadline = time.monotonic() + STEP
    while cluster.kubectl("get", "serviceaccount", "default", "-n", namespace).returncode:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {namespace}"
        time.sleep(0.2)


def _uid(cluster: Cluster, namespace: str, kind: str, name: str) -> str:
    return _ok(cluster, "get", kind, name, "-n", namespace, "-o", "jsonpath={.metadata.uid}")


class Published:
    def __init__(self, first: MeshConfig) -> None:
        self.latest = first
        self.changed = asyncio.Event()

    def __call__(self, mesh: MeshConfig) -> None:
        self.latest = mesh
        self.changed.set()

    async def wait_for(self, predicate: Callable[[MeshConfig], bool]) -> MeshConfig:
        async with asyncio.timeout(STEP):
            while not predicate(self.latest):
                self.changed.clear()
                await self.changed.wait()
        return self.latest


def test_source_follows_the_cluster(cluster):
    kubectl = lambda *args, stdin=None: asyncio.to_thread(_ok, cluster, *args, stdin=stdin)  # noqa: E731
    metrics = m.Metrics()

    async def scenario():
        await kubectl("create", "namespace", "shop")
        await asyncio.to_thread(_wait_for_default_account, cluster, "shop")
        source = KubernetesSource(
            cluster_resources(new_api_client(cluster.spec.admin_kubeconfig)), TD, metrics
        )
        try:
            first = await asyncio.wait_for(source.start(), STEP)
            published = Published(first)
            watching = asyncio.create_task(source.watch(published))
            await _follow(cluster, kubectl, published)
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        finally:
            await source.close()
        return first

    first = asyncio.run(scenario())
    assert not any(w.namespace == "shop" for w in first.workloads.values())
    assert first.nodes == {}


async def _follow(cluster, kubectl, published):
    web = _pod("web", "shop", "n1", command="mkdir -p /w && exec httpd -f -p 8080 -h /w")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        # A named targetPort: resolved from the EndpointSlice.
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }
    await asyncio.to_thread(_apply, cluster, web, service)
    # Not in the mesh until its namespace is.
    await kubectl("label", "namespace", "shop", "weir.dev/mesh=enabled")
    mesh = await published.wait_for(
        lambda mesh: "shop/web" in mesh.services and bool(mesh.workloads["shop/web"].ips)
    )
    workload = mesh.workloads["shop/web"]
    assert workload.uid == await asyncio.to_thread(_uid, cluster, "shop", "pod", "web")
    assert (workload.node, workload.service_account, workload.captured) == ("n1", "default", True)
    assert workload.mtls_mode == mesh_pb2.STRICT
    cluster_ip = await kubectl(
        "get", "service", "web", "-n", "shop", "-o", "jsonpath={.spec.clusterIP}"
    )
    assert mesh.services["shop/web"].service == mesh_pb2.Service(
        name="web",
        namespace="shop",
        vips=[cluster_ip],
        ports=[mesh_pb2.ServicePort(name="http", port=80, target_port=8080)],
        endpoints=["shop/web"],
    )

    peer = {
        "apiVersion": "security.weir.dev/v1alpha1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "relaxed", "namespace": "shop"},
        "spec": {"mode": "PERMISSIVE"},
    }
    await asyncio.to_thread(_apply, cluster, peer)
    await published.wait_for(
        lambda mesh: mesh.workloads["shop/web"].mtls_mode == mesh_pb2.PERMISSIVE
    )

    def policy(name, principal):
        return {
            "apiVersion": "security.weir.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "selector": {"app": "web"},
                "action": "ALLOW",
                "rules": [{"sourcePrincipals": [principal]}],
            },
        }

    # The schema cannot know the trust domain: this one gets in, and is ignored.
    await asyncio.to_thread(
        _apply,
        cluster,
        policy("foreign", "spiffe://elsewhere.example/ns/shop/sa/x"),
        policy("allow", "spiffe://cluster.local/ns/shop/sa/client"),
    )
    mesh = await published.wait_for(lambda mesh: "shop/allow" in mesh.policies)
    assert "shop/foreign" not in mesh.policies
    assert list(mesh.policies["shop/allow"].rules[0].source_principals) == [
        "spiffe://cluster.local/ns/shop/sa/client"
    ]

    # The pod opts out: gone from the mesh, and so is the service it alone backed.
    await kubectl("label", "pod", "web", "-n", "shop", "weir.dev/mesh=disabled")
    await published.wait_for(
        lambda mesh: "shop/web" not in mesh.workloads and "shop/web" not in mesh.services
    )
    await kubectl("label", "pod", "web", "-n", "shop", "weir.dev/mesh-")
    await published.wait_for(lambda mesh: "shop/web" in mesh.services)
    await kubectl("delete", "authorizationpolicy", "allow", "-n", "shop")
    await kubectl("delete", "pod", "web", "-n", "shop", "--wait=true")
    await published.wait_for(
        lambda mesh: "shop/allow" not in mesh.policies and "shop/web" not in mesh.workloads
    )


def _node_pod_token(cluster, pod, *, account="weir-agent", audience="weir"):
    uid = _uid(cluster, "weir-system", "pod", pod)
    return _ok(
        cluster,
        *("create", "token", account, "-n", "weir-system", "--audience", audience),
        *("--bound-object-kind", "Pod", "--bound-object-name", pod, "--bound-object-uid", uid),
    ).strip()


def _agent_setup(cluster):
    accounts = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": "weir-system"},
        }
        for account in ("weir-agent", "other")
    ]
    _apply(cluster, *accounts)
    for name, node, account in (
        ("agent-n1", "n1", "weir-agent"),
        ("agent-gone", "n2", "weir-agent"),
        ("other-n1", "n1", "other"),
    ):
        pod = _pod(name, "weir-system", node, service_account=account)
        _apply(cluster, pod)


def _authenticator(cluster, metrics):
    api = new_api_client(cluster.spec.admin_kubeconfig)
    return TokenReviewAuthenticator(
        api_review(api),
        api_read_pod(api),
        audience="weir",
        service_accounts=NODE_ACCOUNTS,
        metrics=metrics,
    )


def test_token_review(cluster):
    _agent_setup(cluster)
    good = _node_pod_token(cluster, "agent-n1")
    other_account = _node_pod_token(cluster, "other-n1", account="other")
    other_audience = _node_pod_token(cluster, "agent-n1", audience="not-weir")
    gone = _node_pod_token(cluster, "agent-gone")
    _ok(cluster, "delete", "pod", "agent-gone", "-n", "weir-system", "--wait=true")
    metrics = m.Metrics()

    async def scenario():
        auth = _authenticator(cluster, metrics)
        node = await auth.authenticate(auth_metadata(good))
        refusals = {}
        for name, token in (
            ("other_account", other_account),
            ("other_audience", other_audience),
            ("gone", gone),
            ("garbage", "not-a-token"),
        ):
            try:
                await auth.authenticate(auth_metadata(token))
            except RequestRefusedError as exc:
                refusals[name] = (exc.code, exc.reason)
        return node, refusals

    node, refusals = asyncio.run(scenario())
    assert node == "n1"
    assert set(refusals) == {"other_account", "other_audience", "gone", "garbage"}
    assert all(code == grpc.StatusCode.UNAUTHENTICATED for code, _ in refusals.values())
    assert refusals["other_account"][1] == "wrong_service_account"
    # The API server itself refuses a token for another audience or a deleted pod.
    assert refusals["other_audience"][1] in ("token_invalid", "wrong_audience")
    assert refusals["gone"][1] in ("token_invalid", "pod_gone")
    assert (
        sum(
            metrics.value(m.NODE_AUTH_REFUSED, reason=reason)
            for reason in {r for _, r in refusals.values()}
        )
        == 4
    )


def test_root_in_a_secret_and_certificates_only_for_pods_on_the_node(cluster, tmp_path):
    _agent_setup(cluster)
    _ok(cluster, "create", "namespace", "apps")
    _ok(cluster, "label", "namespace", "apps", "weir.dev/mesh=enabled")
    _ok(cluster, "create", "serviceaccount", "server", "-n", "apps")
    _wait_for_default_account(cluster, "apps")
    _apply(
        cluster,
        _pod("client", "apps", "n1", service_account="default"),
        _pod("server", "apps", "n2", service_account="server"),
    )
    api = new_api_client(cluster.spec.admin_kubeconfig)
    now = datetime.datetime.now(datetime.UTC)

    async def roots():
        # Two replicas starting together: one creates the Secret, both use it.
        return await asyncio.gather(
            *(
                asyncio.to_thread(load_or_create_root_secret, api, "weir-system", TD, now=now)
                for _ in range(2)
            )
        )

    first, second = asyncio.run(roots())
    assert first.trust_bundle_pem == second.trust_bundle_pem
    published = _ok(
        cluster,
        "get",
        "configmap",
        "weir-ca-root",
        "-n",
        "weir-system",
        "-o",
        "jsonpath={.data.root-cert\\.pem}",
    )
    assert [published] == first.trust_bundle_pem
    secret = json.loads(_ok(cluster, "get", "secret", "weir-ca", "-n", "weir-system", "-o", "json"))
    assert base64.b64decode(secret["data"]["ca-cert.pem"]).decode() == published
    root_file = tmp_path / "root-cert.pem"
    root_file.write_text(published)
    token = _node_pod_token(cluster, "agent-n1")
    metrics = m.Metrics()

    async def scenario():
        source = KubernetesSource(cluster_resources(api), TD, metrics)
        try:
            mesh = await asyncio.wait_for(source.start(), STEP)
            plane = ControlPlane(
                source=source,
                mesh=mesh,
                ca=first,
                settings=Settings(grpc_listen="127.0.0.1:0", http_listen=None),
                authenticator=_authenticator(cluster, metrics),
                metrics=metrics,
            )
            await plane.start()
            try:
                endpoint = ControlPlaneEndpoint.tls(f"127.0.0.1:{plane.grpc_port}", root_file)
                async with endpoint.open_channel(Backoff()) as channel:
                    issued = await request_certificate(
                        channel, token, f"spiffe://{TD}/ns/apps/sa/default"
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await request_certificate(
                            channel, token, f"spiffe://{TD}/ns/apps/sa/server"
                        )
                    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
                        await request_certificate(
                            channel, "not-a-token", f"spiffe://{TD}/ns/apps/sa/default"
                        )
            finally:
                await plane.stop(grace=0.5)
        finally:
            await source.close()
        return issued, refused.value, unauthenticated.value

    issued, refused, unauthenticated = asyncio.run(scenario())
    assert list(issued.trust_bundle_pem) == [published]
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "n1" in refused.details()
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED
    assert metrics.value(m.CERTS_SIGNED) == 1
