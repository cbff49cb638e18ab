"""Weir installed on a real cluster the way users install it: `kubectl apply -k deploy/`.

One two-node cluster for the module, the Weir image built from this checkout
(scripts/build-weir-image.sh) and imported into both nodes, then the tests
run in order against that install: components Ready, meshed Deployments on
two nodes talking over mTLS, kubelet probes under STRICT, an unlabeled
namespace left alone, a pod that predates the install captured, a policy
applied and deleted with kubectl, the CA refusing tokens that do not prove
the node, and finally `kubectl delete -k deploy/` leaving both nodes clean.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from testbed.k8s_cluster.cluster import Cluster, import_image
from tests.k8s.weir_install import (
    MESHED,
    PLAIN,
    REPO,
    SYSTEM,
    _account,
    _admin_section,
    _apply,
    _deployment,
    _fetch_local,
    _namespace,
    _node_shell,
    _ok,
    _on_node,
    _pod,
    _pods,
    _server_url,
    _service,
    _spiffe,
    _until,
    _wget,
    assert_probes_held,
    install,
    mtls_connections_opened,
    wait_ready,
)

pytestmark = [pytest.mark.netns, pytest.mark.k8s, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def installed(k8s_cluster: Cluster, weir_image: Path) -> Iterator[Cluster]:
    """Weir installed with kubectl, after a meshed pod was already running on n1."""
    cluster = k8s_cluster
    import_image(cluster.spec.state_dir, weir_image)
    _apply(
        cluster,
        _namespace(MESHED, meshed=True),
        _namespace(PLAIN, meshed=False),
        *(_account(MESHED, name) for name in ("server", "client", "early")),
        _account(PLAIN, "loner"),
        _pod(MESHED, "early", "n1", "early"),
    )
    _ok(cluster, "wait", "-n", MESHED, "--for=condition=Ready", "pod/early", "--timeout=120s")
    install(cluster, REPO / "deploy")
    yield cluster


def test_the_install_brings_every_component_to_ready(installed: Cluster) -> None:
    cluster = installed
    deployment = json.loads(
        _ok(cluster, "get", "-n", SYSTEM, "deploy/weir-controlplane", "-o", "json")
    )
    assert deployment["status"]["readyReplicas"] == 2
    for name in ("weir-agent", "weir-proxy"):
        ds = json.loads(_ok(cluster, "get", "-n", SYSTEM, f"ds/{name}", "-o", "json"))
        assert ds["status"]["numberReady"] == ds["status"]["desiredNumberScheduled"] == 2, name
    # Each node's proxy runs two workers (--workers=2), both following the agent as one group.
    for node in ("n1", "n2"):
        agent = _on_node(cluster, SYSTEM, "app.kubernetes.io/name=weir-agent", node)
        url = "http://127.0.0.1:15019/config_dump?section=workers"
        workers = json.loads(_fetch_local(cluster, agent, url))["workers"]
        assert [w["worker"] for w in workers] == [0, 1], workers
        # The image's venv runs on its own OpenSSL 3.5, not Debian 12's 3.0.
        url = "http://127.0.0.1:15019/config_dump?section=node"
        openssl = json.loads(_fetch_local(cluster, agent, url))["node"]["openssl"]
        assert openssl.startswith("OpenSSL 3.5."), openssl
        assert "(Weir's, from /opt/weir/lib/weir-openssl)" in openssl, openssl
        proxies = _admin_section(cluster, node, "proxies")
        assert len(proxies) == 2 and len({p["group"] for p in proxies}) == 1, proxies


@pytest.fixture(scope="module")
def app(installed: Cluster) -> Cluster:
    """A client on n1 and a server on n2 in the meshed namespace, and a loner unmeshed."""
    cluster = installed
    _apply(
        cluster,
        _deployment(MESHED, "server", "n2", 8080),
        _deployment(MESHED, "client", "n1", 9000),
        _service(MESHED, "server", 80, 8080),
        _pod(PLAIN, "loner", "n1", "loner"),
    )
    wait_ready(cluster, [(MESHED, "app=server"), (MESHED, "app=client"), (PLAIN, "app=loner")])
    return cluster


def _client(cluster: Cluster) -> str:
    return _on_node(cluster, MESHED, "app=client", "n1")


def test_meshed_deployments_on_two_nodes_talk_over_mutual_tls(app: Cluster) -> None:
    cluster = app
    server = _on_node(cluster, MESHED, "app=server", "n2")
    _until(
        "the client reaches the server through its Service",
        lambda: _wget(cluster, MESHED, _client(cluster), _server_url()).stdout.strip() == server,
        30,
    )

    proxy = _on_node(cluster, SYSTEM, "app.kubernetes.io/name=weir-proxy", "n2")
    metrics = _fetch_local(cluster, proxy, "http://127.0.0.1:15020/metrics")
    assert mtls_connections_opened(metrics, _spiffe(MESHED, "client"), _spiffe(MESHED, "server"))
    log = _ok(cluster, "logs", "-n", SYSTEM, proxy)
    assert any(
        _spiffe(MESHED, "client") in line and _spiffe(MESHED, "server") in line
        for line in log.splitlines()
    ), log[-3000:]


def test_kubelet_http_and_tcp_probes_pass_under_strict(app: Cluster) -> None:
    cluster = app
    assert_probes_held(cluster, MESHED, ("app=server", "app=client", "app=early"))
    # And they are captured for real: the agent on each node holds them.
    for node, name in (("n2", "server"), ("n1", "client")):
        enrolled = {f"{p['namespace']}/{p['name']}" for p in _admin_section(cluster, node, "pods")}
        assert any(key.startswith(f"{MESHED}/{name}-") for key in enrolled), enrolled


def test_a_pod_in_an_unlabeled_namespace_is_not_captured(app: Cluster) -> None:
    cluster = app
    enrolled = {f"{p['namespace']}/{p['name']}" for p in _admin_section(cluster, "n1", "pods")}
    assert f"{PLAIN}/loner" not in enrolled
    assert f"{MESHED}/early" in enrolled
    # Plaintext from outside the mesh to a STRICT workload is refused by its proxy.
    refused = _wget(cluster, PLAIN, "loner", _server_url())
    assert refused.returncode != 0, refused.stdout


def test_a_pod_running_before_the_install_is_captured_and_meshed(app: Cluster) -> None:
    cluster = app
    server = _on_node(cluster, MESHED, "app=server", "n2")
    assert _wget(cluster, MESHED, "early", _server_url()).stdout.strip() == server
    proxy = _on_node(cluster, SYSTEM, "app.kubernetes.io/name=weir-proxy", "n2")
    metrics = _fetch_local(cluster, proxy, "http://127.0.0.1:15020/metrics")
    early, to_server = _spiffe(MESHED, "early"), _spiffe(MESHED, "server")
    assert mtls_connections_opened(metrics, early, to_server), metrics


def test_an_authorization_policy_applied_with_kubectl_denies_within_5_s(app: Cluster) -> None:
    cluster = app
    client = _client(cluster)
    policy = {
        "apiVersion": "security.weir.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": MESHED},
        "spec": {
            "selector": {"app": "server"},
            "action": "DENY",
            "rules": [{"sourcePrincipals": [_spiffe(MESHED, "client")]}],
        },
    }
    assert _wget(cluster, MESHED, client, _server_url()).returncode == 0
    _apply(cluster, policy)
    took = _until(
        "the policy denies the client",
        lambda: _wget(cluster, MESHED, client, _server_url()).returncode != 0,
        5,
        interval_s=0.2,
    )
    # The early pod's identity is not named: it still gets through.
    assert _wget(cluster, MESHED, "early", _server_url()).returncode == 0
    _ok(cluster, "delete", "-n", MESHED, "authorizationpolicy/deny-client")
    took_back = _until(
        "deleting the policy allows the client again",
        lambda: _wget(cluster, MESHED, client, _server_url()).returncode == 0,
        5,
        interval_s=0.2,
    )
    print(f"denied after {took:.1f} s, allowed again after {took_back:.1f} s")


_CA_REQUEST: Final = """
import asyncio, sys
from pathlib import Path
import grpc
from node_agent.controlplane_access import ControlPlaneEndpoint
from node_agent.controlplane_client import request_certificate
from weir_common.retry import Backoff

async def main() -> None:
    endpoint = ControlPlaneEndpoint.tls(
        "weir-controlplane.weir-system.svc:15012", Path("/etc/weir/ca/root-cert.pem")
    )
    channel = endpoint.open_channel(Backoff(initial=1.0, maximum=1.0))
    try:
        await request_certificate(channel, sys.stdin.read().strip(), sys.argv[1])
        print("SIGNED")
    except grpc.aio.AioRpcError as e:
        print(e.code().name, e.details())
    finally:
        await channel.close()

asyncio.run(main())
"""


def _ca_answer(cluster: Cluster, token: str, identity: str) -> str:
    """What the CA says to `token` asking for `identity`, asked from n1's agent pod."""
    agent = _on_node(cluster, SYSTEM, "app.kubernetes.io/name=weir-agent", "n1")
    return _ok(
        cluster,
        "exec",
        "-i",
        "-n",
        SYSTEM,
        agent,
        "--",
        "python3",
        "-c",
        _CA_REQUEST,
        identity,
        stdin=token,
    ).strip()


def _bound_token(cluster: Cluster, namespace: str, account: str, pod: str) -> str:
    uid = _ok(cluster, "get", "-n", namespace, f"pod/{pod}", "-o", "jsonpath={.metadata.uid}")
    return _ok(
        cluster,
        "create",
        "token",
        account,
        "-n",
        namespace,
        "--audience=weir",
        "--bound-object-kind=Pod",
        f"--bound-object-name={pod}",
        f"--bound-object-uid={uid}",
    ).strip()


def test_the_ca_signs_only_what_the_tokens_node_hosts(app: Cluster) -> None:
    cluster = app
    agent_n1 = _on_node(cluster, SYSTEM, "app.kubernetes.io/name=weir-agent", "n1")
    agent_n2 = _on_node(cluster, SYSTEM, "app.kubernetes.io/name=weir-agent", "n2")
    n1_token = _bound_token(cluster, SYSTEM, "weir-agent", agent_n1)
    n2_token = _bound_token(cluster, SYSTEM, "weir-agent", agent_n2)
    client, server = _spiffe(MESHED, "client"), _spiffe(MESHED, "server")
    # The client runs on n1, the server on n2: each agent's token gets its own node's only.
    assert _ca_answer(cluster, n1_token, client) == "SIGNED"
    assert _ca_answer(cluster, n1_token, server).startswith("PERMISSION_DENIED")
    assert _ca_answer(cluster, n2_token, client).startswith("PERMISSION_DENIED")
    # A token of another service account, bound to a pod on n1, proves no node.
    other = _bound_token(cluster, MESHED, "client", _client(cluster))
    assert _ca_answer(cluster, other, client).startswith("UNAUTHENTICATED")


# One request at a time until told to stop (bounded by count); then the tally.
_ROLLOUT_LOAD: Final = (
    "ok=0; failed=0; i=0; while [ ! -e /tmp/weir-stop-load ] && [ $i -lt 5000 ]; do "
    f"if timeout 3 wget -qO- {_server_url()} >/dev/null 2>&1; "
    "then ok=$((ok+1)); else failed=$((failed+1)); fi; i=$((i+1)); sleep 0.05; done; "
    'echo "ok=$ok failed=$failed"'
)


def test_the_proxy_rolls_with_a_surge_and_every_pod_stays_served(app: Cluster) -> None:
    # maxSurge: each node's new proxy starts beside the old one and takes every
    # pod (SO_REUSEPORT in the pod), then the old one drains and leaves.
    cluster = app
    selector = "app.kubernetes.io/name=weir-proxy"
    before = {p["metadata"]["name"] for p in _pods(cluster, SYSTEM, selector)}
    client = _client(cluster)
    # Requests through both proxies (client on n1, server on n2) all along the rollout.
    load = subprocess.Popen(
        cluster.kubectl_argv("exec", "-n", MESHED, client, "--", "sh", "-c", _ROLLOUT_LOAD),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(2)
        _ok(cluster, "rollout", "restart", "-n", SYSTEM, "daemonset/weir-proxy")
        _ok(cluster, "rollout", "status", "-n", SYSTEM, "daemonset/weir-proxy", "--timeout=180s")
        _until(
            "the old proxies are gone",
            lambda: not before & {p["metadata"]["name"] for p in _pods(cluster, SYSTEM, selector)},
            60,
        )
        _ok(cluster, "exec", "-n", MESHED, client, "--", "sh", "-c", ": >/tmp/weir-stop-load")
        output, _ = load.communicate(timeout=30)
    finally:
        load.kill()
    ok, failed = (int(w.split("=")[1]) for w in output.split()[-2:])
    print(f"requests during the proxy rollout: {ok} answered, {failed} failed")
    assert failed == 0, output
    assert ok >= 20, output
    for proxy in _pods(cluster, SYSTEM, selector):
        # The surge pod started at once: no crash loop on ports the old one held.
        assert [s["restartCount"] for s in proxy["status"]["containerStatuses"]] == [0]
    server = _on_node(cluster, MESHED, "app=server", "n2")

    def reaches_server(source: str) -> bool:
        return _wget(cluster, MESHED, source, _server_url()).stdout.strip() == server

    for source in (client, "early"):
        _until(
            f"{source} reaches the server through the new proxies",
            functools.partial(reaches_server, source),
            30,
        )
    new_proxy = _on_node(cluster, SYSTEM, selector, "n2")
    assert "mutual_tls" in _fetch_local(cluster, new_proxy, "http://127.0.0.1:15020/metrics")
    # The agent, in its container, set what lets queued connections move to the
    # successor in the server's netns (through the host's /proc: its own is read-only).
    migrate = _node_shell(
        cluster,
        cluster.spec.nodes[1],
        'for n in /var/run/netns/*; do nsenter --net="$n" sh -c '
        '"ss -Hltn sport = :15008 | grep -q . && cat /proc/sys/net/ipv4/tcp_migrate_req"; '
        "done; true",
    )
    assert migrate.split() and set(migrate.split()) == {"1"}, migrate


# Every rule set a pod's netns holds, in both iptables backends.
_POD_RULES: Final = (
    'for n in /var/run/netns/*; do [ -e "$n" ] || continue; echo "== $n"; '
    'nsenter --net="$n" iptables-nft-save 2>/dev/null; '
    'nsenter --net="$n" iptables-legacy-save 2>/dev/null; done'
)


def test_uninstall_leaves_every_node_clean(app: Cluster) -> None:
    cluster = app
    # Capture is there before, so its absence after is the uninstall's doing.
    before = _node_shell(cluster, cluster.spec.nodes[0], _POD_RULES)
    assert "WEIR-" in before
    _ok(cluster, "delete", "-k", str(REPO / "deploy"), "--wait=true", timeout=300)
    for node in cluster.spec.nodes:
        conf_dir = cluster.spec.node_dir(node) / "cni-conf"
        for conflist in conf_dir.glob("*.conflist"):
            assert "weir-cni" not in conflist.read_text(), conflist
        assert not (cluster.spec.node_dir(node) / "cni-bin" / "weir-cni").exists()
        pods = _node_shell(cluster, node, _POD_RULES)
        assert "WEIR" not in pods, pods
        host = _node_shell(cluster, node, "iptables-nft-save; iptables-legacy-save")
        assert "WEIR" not in host, host
        pins = _node_shell(cluster, node, "ls -A /sys/fs/bpf 2>/dev/null || true")
        assert "weir" not in pins, pins
    # Meshed pods keep running, now outside the mesh: plaintext reaches the server.
    server = _on_node(cluster, MESHED, "app=server", "n2")
    _until(
        "the client reaches the server in plaintext",
        lambda: _wget(cluster, MESHED, _client(cluster), _server_url()).stdout.strip() == server,
        30,
    )
