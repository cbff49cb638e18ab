"""The node agent following a real cluster: run in node n1's namespaces against its API server.

A pod of a meshed namespace runs on n1 before the agent starts (the node's
conflist has no weir-cni, so nothing captured it). The agent, started with
a wrong token, cannot reach its control plane; the token file is then
rewritten, and the agent picks the new token up, gets its mesh config, finds
the pod's sandbox in /proc and enrolls it: its sandbox id and netns are the
ones containerd holds for the pod, and `weir redirect check` finds the
capture (with the pod's annotated exclusion) in the pod's netns. Labeling
the pod weir.dev/mesh=disabled removes the capture; removing the label puts
it back.

With weir-cni installed in n1's conflist by the agent, new pods meet the
ADD gate: a meshed pod the control plane declares is captured by its ADD, a
bad capture annotation is refused by name, a meshed pod the control plane
never pushes is held back (retryable ADD), and a pod of an unlabeled
namespace starts uncaptured.

The control plane is the local-mode one (a YAML file declaring the pods),
TLS on the node's loopback; the proxy is a stand-in that follows the
agent's handoff socket, since this test is about enrollment.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_agent.localmesh.mesh import PLUGIN_BUNDLE, REPO, http_get, weir_command
from node_agent.netns import Netns
from node_agent.proxy_handoff.protocol import EnrolledPod
from node_agent.proxy_handoff.proxy_side import ProxyHandoffClient
from testbed.k8s_cluster import config
from testbed.k8s_cluster.cluster import Cluster
from weir_common.kubernetes import MESH_LABEL

pytestmark = [pytest.mark.netns, pytest.mark.k8s, pytest.mark.timeout(600)]

NETNS_DIR = Path("/var/run/netns")
GOOD_TOKEN = "n1-test-bootstrap-token-0123456789"
CP_GRPC = "127.0.0.1:15012"
CP_HTTP = "127.0.0.1:15014"


class StandInProxy:
    """Follows the agent's handoff socket and acks every pod (no listeners: enrollment only)."""

    def __init__(self, socket_path: Path) -> None:
        self.pods: dict[str, EnrolledPod] = {}
        self._loop = asyncio.new_event_loop()
        self._client = ProxyHandoffClient(socket_path, self)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._client.run())
        self._loop.run_forever()

    async def add_pod(self, pod: EnrolledPod, netns: Netns) -> None:
        self.pods[pod.uid] = pod

    async def remove_pod(self, uid: str) -> None:
        self.pods.pop(uid, None)

    async def _shutdown(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def ok(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    done = cluster.kubectl(*args, stdin=stdin)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def eventually(what: str, probe: Callable[[], Any], timeout_s: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.5)


class NodeSide:
    """Processes run inside node n1's netns and mount namespace, stopped at the end."""

    def __init__(self, cluster: Cluster, work: Path) -> None:
        self.node = cluster.spec.nodes[0]
        self.netns_path = NETNS_DIR / self.node.netns
        self.netns = Netns.validate(self.netns_path)
        self.mount_ns = cluster.spec.mount_ns(self.node)
        self.work = work
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        # Deleted at the end (their pods with them).
        self.namespaces: list[str] = []

    def enter(self) -> list[str]:
        return ["nsenter", f"--mount={self.mount_ns}", f"--net={self.netns_path}", "--"]

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [*self.enter(), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.processes.append((name, process))
        return process

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.enter(), *argv], capture_output=True, text=True, timeout=60, check=False
        )

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop_all(self) -> None:
        for _, process in reversed(self.processes):
            process.terminate()
        for _, process in reversed(self.processes):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def admin(self, section: str) -> Any:
        try:
            status, body = http_get(self.netns, "127.0.0.1", 15000, "/config_dump")
        except OSError:
            return None
        return json.loads(body)[section] if status == 200 else None

    def ready(self) -> tuple[int, str]:
        try:
            status, body = http_get(self.netns, "127.0.0.1", 15021, "/healthz/ready")
        except OSError as e:
            return 0, str(e)
        return status, body.decode(errors="replace")


def start_controlplane(side: NodeSide, mesh: dict[str, Any]) -> Path:
    """The local-mode control plane on the node's loopback (TLS); its root's path."""
    (side.work / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    side.start(
        "controlplane",
        [
            *weir_command(),
            "controlplane",
            "--config",
            str(side.work / "mesh.yaml"),
            "--listen",
            CP_GRPC,
            "--http-listen",
            CP_HTTP,
            "--state-dir",
            str(side.work / "cp"),
        ],
    )
    root = side.work / "cp" / "root-cert.pem"
    eventually("control plane root", root.exists, 30)
    return root


def start_agent(
    side: NodeSide, cluster: Cluster, root: Path, token: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """`weir agent --kubernetes` for n1; it reaches the API server over the underlay."""
    kubeconfig = side.work / "kubeconfig"
    kubeconfig.write_text(config.kubeconfig(cluster.spec, cluster.spec.apiserver_url, "admin"))
    (side.work / "run").mkdir()
    return side.start(
        "agent",
        [
            *weir_command(),
            "--log-level",
            "info",
            "agent",
            "--kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--node",
            "n1",
            "--controlplane",
            CP_GRPC,
            "--controlplane-ca",
            str(root),
            "--token-file",
            str(token),
            "--state-dir",
            str(side.work / "state"),
            "--run-dir",
            str(side.work / "run"),
            "--redirect-mode",
            "iptables",
            *extra,
        ],
    )


def mesh_config(*pods: tuple[str, str]) -> dict[str, Any]:
    """Node n1 and the pods (namespace, name) the control plane declares, all on n1."""
    return {
        "trustDomain": "cluster.local",
        "nodes": [{"name": "n1", "bootstrapToken": GOOD_TOKEN}],
        "namespaces": [
            {"name": namespace, "mtlsMode": "STRICT"} for namespace in sorted({n for n, _ in pods})
        ],
        "workloads": [
            {
                "name": name,
                "namespace": namespace,
                "serviceAccount": name,
                "node": "n1",
                "labels": {"app": name},
            }
            for namespace, name in pods
        ],
    }


def pod_manifest(
    namespace: str = "shop",
    name: str = "web",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": name},
            "annotations": (
                {"weir.dev/exclude-outbound-ports": "22"} if annotations is None else annotations
            ),
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "n1"},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": config.TEST_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"],
                }
            ],
        },
    }


@pytest.fixture
def node_side(k8s_cluster: Cluster) -> Iterator[NodeSide]:
    work = Path(tempfile.mkdtemp(prefix="wk8s-agent-"))
    side = NodeSide(k8s_cluster, work)
    try:
        yield side
    finally:
        side.stop_all()
        for namespace in side.namespaces:
            k8s_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        shutil.rmtree(work, ignore_errors=True)


def sandbox_of(side: NodeSide, container_id: str) -> dict[str, Any]:
    """containerd's own record of a container: its labels and OCI spec."""
    done = side.run(
        [
            "ctr",
            "--address",
            config.CONTAINERD_SOCKET,
            "--namespace",
            "k8s.io",
            "containers",
            "info",
            container_id,
        ]
    )
    assert done.returncode == 0, done.stderr
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def capture_check(side: NodeSide, netns: str, backend: str) -> subprocess.CompletedProcess[str]:
    return side.run(
        [
            *weir_command(),
            "redirect",
            "check",
            "--netns",
            netns,
            "--mode",
            "iptables",
            "--iptables-backend",
            backend,
            "--exclude-outbound-ports",
            "22",
        ]
    )


def test_agent_enrolls_a_running_pod_follows_its_label_and_a_rotated_token(
    k8s_cluster: Cluster, node_side: NodeSide
) -> None:
    cluster, side, work = k8s_cluster, node_side, node_side.work
    side.namespaces.append("shop")
    ok(cluster, "create", "namespace", "shop")
    ok(cluster, "label", "namespace", "shop", f"{MESH_LABEL}=enabled")
    ok(cluster, "apply", "-f", "-", stdin=json.dumps(pod_manifest()))
    ok(cluster, "-n", "shop", "wait", "--for=condition=Ready", "pod/web", "--timeout=120s")
    pod = json.loads(ok(cluster, "-n", "shop", "get", "pod", "web", "-o", "json"))
    uid = pod["metadata"]["uid"]

    root = start_controlplane(side, mesh_config(("shop", "web")))
    token = work / "token"
    token.write_text("not-the-right-token\n")
    agent = start_agent(side, cluster, root, token)
    run_dir = work / "run"
    eventually("agent handoff socket", (run_dir / "proxy.sock").exists, 30)
    proxy = StandInProxy(run_dir / "proxy.sock")
    try:
        # The pod watch syncs; the control plane refuses the wrong token: not ready, not enrolled.
        eventually("pod watch synced", lambda: (side.admin("kubernetes") or {}).get("synced"))
        refused = eventually("token refused", lambda: "UNAUTHENTICATED" in side.ready()[1], 30)
        assert refused and side.ready()[0] != 200
        assert agent.poll() is None, side.log("agent")

        # The kubelet-style rotation: a new file swapped in; the agent uses it from then on.
        fresh = work / "token.new"
        fresh.write_text(GOOD_TOKEN + "\n")
        fresh.replace(token)
        eventually("agent ready", lambda: side.ready()[0] == 200, 60)

        def enrolled() -> dict[str, Any] | None:
            pods = side.admin("pods") or []
            return next((p for p in pods if p["uid"] == uid and p["status"] == "captured"), None)

        record = eventually("running pod enrolled", enrolled, 45)
        # The sandbox and netns the CNI ADD would have carried, as containerd has them.
        sandbox = sandbox_of(side, record["container_id"])
        assert sandbox["Labels"]["io.kubernetes.pod.uid"] == uid
        assert sandbox["Labels"]["io.cri-containerd.kind"] == "sandbox"
        network = [ns for ns in sandbox["Spec"]["linux"]["namespaces"] if ns["type"] == "network"]
        assert record["netns"] == network[0]["path"]
        assert record["netns"].startswith("/var/run/netns/")
        assert record["ips"] == [f"{pod['status']['podIP']}/32"]
        assert [p.name for p in proxy.pods.values()] == ["web"]
        backend = side.admin("capture")["mode"].removeprefix("iptables-")
        checked = capture_check(side, record["netns"], backend)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert side.admin("kubernetes")["pods"]["shop/web"] == "captured"

        # Opting the pod out unenrolls it: capture gone from its netns, the proxy let go.
        ok(cluster, "-n", "shop", "label", "pod", "web", f"{MESH_LABEL}=disabled")
        eventually("opted-out pod unenrolled", lambda: enrolled() is None, 15)
        assert capture_check(side, record["netns"], backend).returncode != 0
        assert proxy.pods == {}
        assert "labeled weir.dev/mesh=disabled" in side.admin("kubernetes")["pods"]["shop/web"]

        # Back in: enrolled again, same sandbox, capture back.
        ok(cluster, "-n", "shop", "label", "pod", "web", f"{MESH_LABEL}-")
        again = eventually("pod enrolled again", enrolled, 15)
        assert (again["container_id"], again["netns"]) == (
            record["container_id"],
            record["netns"],
        )
        checked = capture_check(side, record["netns"], backend)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert agent.poll() is None, side.log("agent")
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def plugin_bundle() -> Path:
    subprocess.run(["scripts/build-cni-plugin.sh"], cwd=REPO, check=True, timeout=300)
    return PLUGIN_BUNDLE


def events_of(cluster: Cluster, namespace: str, pod: str) -> str:
    listed = cluster.kubectl(
        "-n",
        namespace,
        "get",
        "events",
        f"--field-selector=involvedObject.name={pod}",
        "-o",
        "json",
    )
    if listed.returncode != 0:
        return ""
    return "\n".join(e.get("message", "") for e in json.loads(listed.stdout)["items"])


def test_cni_add_captures_meshed_pods_refuses_bad_annotations_and_holds_unpushed_ones(
    k8s_cluster: Cluster, node_side: NodeSide, plugin_bundle: Path
) -> None:
    cluster, side = k8s_cluster, node_side
    for namespace in ("store", "plain"):
        side.namespaces.append(namespace)
        ok(cluster, "create", "namespace", namespace)
    ok(cluster, "label", "namespace", "store", f"{MESH_LABEL}=enabled")
    root = start_controlplane(side, mesh_config(("store", "late"), ("store", "bad")))
    token = side.work / "token"
    token.write_text(GOOD_TOKEN + "\n")
    agent = start_agent(
        side,
        cluster,
        root,
        token,
        "--cni-conf-dir",
        config.NODE_CNI_CONF_DIR,
        "--cni-bin-dir",
        config.NODE_CNI_BIN_DIR,
        "--cni-plugin-bundle",
        str(plugin_bundle),
    )
    run_dir = side.work / "run"
    eventually("agent handoff socket", (run_dir / "proxy.sock").exists, 30)
    proxy = StandInProxy(run_dir / "proxy.sock")
    try:
        eventually("agent ready (weir-cni installed)", lambda: side.ready()[0] == 200, 60)
        bad_annotation = {"weir.dev/exclude-inbound-ports": "ssh"}
        pods = [
            pod_manifest("store", "late"),
            pod_manifest("store", "bad", bad_annotation),
            pod_manifest("store", "unpushed"),
            pod_manifest("plain", "open"),
        ]
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": pods})
        ok(cluster, "apply", "-f", "-", stdin=manifest)
        ok(cluster, "-n", "store", "wait", "--for=condition=Ready", "pod/late", "--timeout=90s")
        ok(cluster, "-n", "plain", "wait", "--for=condition=Ready", "pod/open", "--timeout=90s")

        # Captured by its ADD: the record holds the sandbox id and netns the runtime passed.
        late = json.loads(ok(cluster, "-n", "store", "get", "pod", "late", "-o", "json"))
        records = {p["name"]: p for p in side.admin("pods")}
        assert set(records) == {"late"}, records
        record = records["late"]
        assert (record["uid"], record["status"]) == (late["metadata"]["uid"], "captured")
        sandbox = sandbox_of(side, record["container_id"])
        assert sandbox["Labels"]["io.cri-containerd.kind"] == "sandbox"
        assert sandbox["Labels"]["io.kubernetes.pod.uid"] == late["metadata"]["uid"]
        backend = side.admin("capture")["mode"].removeprefix("iptables-")
        checked = capture_check(side, record["netns"], backend)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        # The bad annotation is refused by name, not retried into a running pod.
        refused = eventually(
            "bad annotation in the pod's events",
            lambda: (
                "annotation weir.dev/exclude-inbound-ports" in events_of(cluster, "store", "bad")
            ),
        )
        assert refused
        # Meshed, but the control plane never pushes it: held back, never started uncaptured.
        held = eventually(
            "unpushed pod held back",
            lambda: "has not pushed its workload yet" in events_of(cluster, "store", "unpushed"),
        )
        assert held
        status = side.admin("kubernetes")["pods"]
        assert status["store/bad"].startswith(
            "not enrolled: annotation weir.dev/exclude-inbound-ports: 'ssh'"
        )
        assert status["plain/open"] == (
            "not in the mesh: namespace is not labeled weir.dev/mesh=enabled"
        )
        for name in ("bad", "unpushed"):
            phase = ok(cluster, "-n", "store", "get", "pod", name, "-o", "jsonpath={.status.phase}")
            assert phase == "Pending", name
        assert agent.poll() is None, side.log("agent")
    finally:
        proxy.stop()
        # Stopped first: its installer would put weir-cni back.
        agent.terminate()
        agent.wait(15)
        side.run(
            [
                *weir_command(),
                "cni",
                "uninstall",
                "--conf-dir",
                config.NODE_CNI_CONF_DIR,
                "--bin-dir",
                config.NODE_CNI_BIN_DIR,
            ]
        )
