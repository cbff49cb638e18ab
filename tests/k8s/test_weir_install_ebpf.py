"""Weir's eBPF capture installed on a real cluster: `kubectl apply -k deploy/overlays/ebpf`.

The shipped overlay mounts the node's bpffs, cgroup v2 root, /lib/modules
and /usr/src. This machine differs from a standard systemd node in two ways a
user would set in their own overlay, as deploy/README.md says: its cgroup v2
hierarchy is at /sys/fs/cgroup/unified (hybrid), and its kernel ships no
headers, so bcc gets the checkout's merged tree (`make deps`). The test
writes that overlay into a temp dir, on top of the repository's.

Then: the agents pick eBPF and pin into each node's own bpffs, a meshed
client on n1 reaches a meshed server on n2 over mTLS, kubelet probes keep
passing, capture holds while an agent restarts, and `kubectl delete -k`
leaves no pin on either node.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from node_agent.redirect.ebpf.pins import require_root_cgroup
from testbed.k8s_cluster.cluster import Cluster, import_image
from tests.k8s.weir_install import (
    MESHED,
    SYSTEM,
    _account,
    _apply,
    _deployment,
    _fetch_local,
    _namespace,
    _node_shell,
    _ok,
    _on_node,
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
from weir_common.errors import NodeSetupError

pytestmark = [pytest.mark.netns, pytest.mark.k8s, pytest.mark.timeout(900)]

REPO: Final = Path(__file__).resolve().parents[2]
KERNEL_SOURCE: Final = REPO / "build" / "bcc-kernel-source"
AGENT: Final = "app.kubernetes.io/name=weir-agent"
CGROUP2: Final = Path("/sys/fs/cgroup/unified")
# What this machine's nodes need on top of the shipped overlay (see the docstring).
_OVERLAY: Final = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata:
        name: weir-agent
        namespace: weir-system
      spec:
        template:
          spec:
            containers:
              - name: agent
                env:
                  - name: WEIR_CGROUP2_ROOT
                    value: /host/sys/fs/cgroup/unified
                  - name: WEIR_BCC_KERNEL_SOURCE
                    value: /opt/weir/kernel-source
                volumeMounts:
                  - name: kernel-source
                    mountPath: /opt/weir/kernel-source
                    readOnly: true
            volumes:
              - name: kernel-source
                hostPath:
                  path: {kernel_source}
                  type: Directory
"""


def test_only_the_root_of_the_cgroup_v2_hierarchy_is_taken_for_it() -> None:
    # What the pod's guard rests on: a bind of a subtree, or a cgroup namespace's
    # view, names a cgroup below the root, which would miss most sockets.
    assert require_root_cgroup(CGROUP2) == CGROUP2
    below = next(p for p in CGROUP2.iterdir() if p.is_dir())
    with pytest.raises(NodeSetupError, match="below the root"):
        require_root_cgroup(below)
    with pytest.raises(NodeSetupError, match="not a cgroup v2 filesystem"):
        require_root_cgroup(Path("/sys/fs/bpf"))


_NO_BPFFS_IN_POD: Final = """
from pathlib import Path
from node_agent.redirect.ebpf.pins import PinLayout, ensure_bpffs, mount_of, read_mounts
from node_agent.redirect.ebpf.preflight import run_preflight
from weir_common.errors import NodeSetupError
finding = [f for f in run_preflight(PinLayout(), load_test=False).findings if f.what == "bpffs"]
print("preflight", finding[0].ok, finding[0].detail)
try:
    ensure_bpffs(Path("/sys/fs/bpf/weir"))
except NodeSetupError as e:
    print("refused", e.message)
print("fstype", mount_of(Path("/sys/fs/bpf"), read_mounts()).fstype)
"""


def test_an_agent_in_a_pod_without_the_nodes_bpffs_refuses_to_mount_its_own() -> None:
    # A private mount namespace where /sys/fs/bpf is no bpffs, as in a pod whose
    # node has none; it goes away with the process.
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs tmpfs /sys/fs/bpf && exec "$0" -c "$1"',
         sys.executable, _NO_BPFFS_IN_POD],
        env={**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1"},
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("preflight False no bpffs at /sys/fs/bpf in the agent's pod"), lines
    assert lines[1].startswith("refused no bpffs at /sys/fs/bpf in the agent's pod"), lines
    assert lines[2] == "fstype tmpfs", lines


def _pins(cluster: Cluster) -> dict[str, str]:
    """What each node's own /sys/fs/bpf holds (its mount namespace's bpffs), but the
    iterators every new bpffs gets from the kernel (maps.debug, progs.debug)."""
    script = "cd /sys/fs/bpf && find . -mindepth 1 ! -path './*.debug' | sort"
    return {node.name: _node_shell(cluster, node, script) for node in cluster.spec.nodes}


@pytest.fixture(scope="module")
def overlay() -> Iterator[Path]:
    assert (KERNEL_SOURCE / ".complete").is_file(), f"{KERNEL_SOURCE} missing: run `make deps`"
    work = Path(tempfile.mkdtemp(prefix="weir-ebpf-overlay-"))
    try:
        (work / "kustomization.yaml").write_text(
            _OVERLAY.format(
                # kustomize takes no absolute path to another kustomization.
                base=os.path.relpath(REPO / "deploy" / "overlays" / "ebpf", work),
                kernel_source=KERNEL_SOURCE,
            )
        )
        yield work
    finally:
        shutil.rmtree(work)


@pytest.fixture(scope="module")
def installed(k8s_cluster: Cluster, weir_image: Path, overlay: Path) -> Iterator[Cluster]:
    cluster = k8s_cluster
    assert _pins(cluster) == {"n1": "", "n2": ""}, "each node starts with an empty bpffs"
    import_image(cluster.spec.state_dir, weir_image)
    install(cluster, overlay)
    yield cluster


def _exec_agent(cluster: Cluster, node: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "exec", "-n", SYSTEM, _on_node(cluster, SYSTEM, AGENT, node), "--", *argv
    )


def test_every_agent_chooses_ebpf_and_its_preflight_passes_in_the_pod(installed: Cluster) -> None:
    cluster = installed
    for node in ("n1", "n2"):
        preflight = _exec_agent(cluster, node, "weir", "redirect", "preflight")
        assert preflight.returncode == 0, preflight.stdout + preflight.stderr
        assert "cgroup v2: root at /host/sys/fs/cgroup/unified" in preflight.stdout
        status = _exec_agent(cluster, node, "weir", "node", "status", "-o", "json")
        assert json.loads(status.stdout)["redirect"]["mode"] == "ebpf", status.stdout


@pytest.fixture(scope="module")
def app(installed: Cluster) -> Cluster:
    """A client on n1 and a server on n2 in the meshed namespace."""
    cluster = installed
    _apply(
        cluster,
        _namespace(MESHED, meshed=True),
        *(_account(MESHED, name) for name in ("server", "client")),
        _deployment(MESHED, "server", "n2", 8080),
        _deployment(MESHED, "client", "n1", 9000),
        _service(MESHED, "server", 80, 8080),
    )
    wait_ready(cluster, [(MESHED, "app=server"), (MESHED, "app=client")])
    return cluster


def test_meshed_pods_on_two_nodes_talk_over_mutual_tls_captured_by_ebpf(app: Cluster) -> None:
    cluster = app
    server = _on_node(cluster, MESHED, "app=server", "n2")
    client = _on_node(cluster, MESHED, "app=client", "n1")
    _until(
        "the client reaches the server through its Service",
        lambda: _wget(cluster, MESHED, client, _server_url()).stdout.strip() == server,
        30,
    )
    proxy = _on_node(cluster, SYSTEM, "app.kubernetes.io/name=weir-proxy", "n2")
    metrics = _fetch_local(cluster, proxy, "http://127.0.0.1:15020/metrics")
    assert mtls_connections_opened(metrics, _spiffe(MESHED, "client"), _spiffe(MESHED, "server"))
    # Pinned in each node's bpffs, not one private to the agent's pod: capture
    # outlives the agent.
    for node, pins in _pins(cluster).items():
        assert "./weir/links/weir_connect4" in pins.splitlines(), (node, pins)
        assert "./weir/progs/weir_sk_lookup" in pins.splitlines(), (node, pins)
    # Captured by eBPF: each agent's own check of the pod against the kernel's maps.
    for node, pod in (("n1", client), ("n2", server)):
        checked = _exec_agent(cluster, node, "weir", "node", "pod", f"{MESHED}/{pod}", "-o", "json")
        capture = json.loads(checked.stdout)["capture"]
        assert capture["mode"] == "ebpf" and capture["as_expected"], checked.stdout


def test_kubelet_probes_pass(app: Cluster) -> None:
    cluster = app
    assert_probes_held(cluster, MESHED, ("app=server", "app=client"))


def test_capture_outlives_an_agent_restart(app: Cluster) -> None:
    cluster = app
    server = _on_node(cluster, MESHED, "app=server", "n2")
    client = _on_node(cluster, MESHED, "app=client", "n1")
    agent = _on_node(cluster, SYSTEM, AGENT, "n1")
    _ok(cluster, "delete", "pod", "-n", SYSTEM, agent, "--wait=true", timeout=60)
    # No agent on n1 now, yet the pinned programs still capture the client.
    reply = _wget(cluster, MESHED, client, _server_url())
    assert reply.stdout.strip() == server, reply.stderr
    _ok(cluster, "rollout", "status", "-n", SYSTEM, "daemonset/weir-agent", "--timeout=120s")
    checked = _exec_agent(cluster, "n1", "weir", "node", "pod", f"{MESHED}/{client}", "-o", "json")
    assert json.loads(checked.stdout)["capture"]["as_expected"], checked.stdout


def test_uninstall_leaves_no_pins(app: Cluster, overlay: Path) -> None:
    cluster = app
    assert all(pins for pins in _pins(cluster).values())
    _ok(cluster, "delete", "-k", str(overlay), "--wait=true", timeout=300)
    assert _pins(cluster) == {"n1": "", "n2": ""}
