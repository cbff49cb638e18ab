"""Finding a running pod's sandbox id and netns in /proc: both cgroup drivers, and refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node_agent.kubernetes.discovery import (
    HostProc,
    ProcessInfo,
    Sandbox,
    app_container_ids,
    find_sandbox,
    index_processes,
    pod_container,
)

UID = "5f3c2a1e-8b7d-4c6e-9f01-23456789abcd"
PAUSE = "a" * 64
APP = "b" * 64
SIDE = "c" * 64
OTHER_UID = "11111111-2222-3333-4444-555555555555"


def cgroupfs(uid: str, cid: str, qos: str = "besteffort/") -> str:
    # cgroup v1: one line per hierarchy, every one naming the same path.
    path = f"/wk8s-1/n1/kubepods/{qos}pod{uid}/{cid}"
    return f"12:pids:{path}\n11:memory:{path}\n1:name=systemd:{path}\n"


def systemd(uid: str, cid: str) -> str:
    slice_uid = uid.replace("-", "_")
    return (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{cid}.scope\n"
    )


def pod(uid: str = UID, *apps: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": "web", "uid": uid},
        "status": {"containerStatuses": [{"containerID": f"containerd://{c}"} for c in apps]},
    }


def test_pod_container_reads_both_drivers_and_guaranteed_pods() -> None:
    assert pod_container(cgroupfs(UID, PAUSE)) == (UID, PAUSE)
    assert pod_container(cgroupfs(UID, PAUSE, qos="")) == (UID, PAUSE)
    assert pod_container(systemd(UID, APP)) == (UID, APP)
    assert pod_container("0::/system.slice/containerd.service\n") is None
    # A pod's own cgroup (no container level) is not a container.
    assert pod_container(f"0::/kubepods/besteffort/pod{UID}\n") is None


def test_app_container_ids_cover_init_and_ephemeral_and_skip_unstarted() -> None:
    status = {
        "containerStatuses": [{"containerID": f"containerd://{APP}"}, {"name": "not started"}],
        "initContainerStatuses": [{"containerID": f"cri-o://{SIDE}"}],
        "ephemeralContainerStatuses": [{"containerID": "docker://nonsense"}],
    }
    assert app_container_ids({"status": status}) == {APP, SIDE}


def test_the_sandbox_is_the_container_the_status_does_not_list() -> None:
    index = index_processes(
        [
            ProcessInfo(100, cgroupfs(UID, PAUSE), netns_inode=4026532001),
            ProcessInfo(120, cgroupfs(UID, APP), netns_inode=4026532001),
            ProcessInfo(121, cgroupfs(UID, APP), netns_inode=4026532001),
            ProcessInfo(200, cgroupfs(OTHER_UID, SIDE), netns_inode=4026532002),
            ProcessInfo(1, "0::/init.scope\n", netns_inode=4026531840),
        ]
    )
    named = {4026532001: "/var/run/netns/cni-1234", 4026532002: "/var/run/netns/cni-5678"}
    assert find_sandbox(pod(UID, APP), index, named) == Sandbox(
        PAUSE, "/var/run/netns/cni-1234", 100
    )
    # The netns has no name: the pause process's own netns file stands in.
    assert find_sandbox(pod(UID, APP), index, {}) == Sandbox(PAUSE, "/proc/100/ns/net", 100)


def test_systemd_driver_pod_is_found() -> None:
    index = index_processes(
        [ProcessInfo(7, systemd(UID, PAUSE), 9), ProcessInfo(8, systemd(UID, APP), 9)]
    )
    assert find_sandbox(pod(UID, APP), index, {9: "/var/run/netns/x"}) == Sandbox(
        PAUSE, "/var/run/netns/x", 7
    )


def test_what_cannot_be_told_for_sure_is_refused_with_a_reason() -> None:
    index = index_processes(
        [
            ProcessInfo(100, cgroupfs(UID, PAUSE), 1),
            ProcessInfo(120, cgroupfs(UID, APP), 1),
        ]
    )
    # No process of the pod at all (not started yet, or another node's).
    assert "no process of pod uid" in str(find_sandbox(pod(OTHER_UID), index, {}))
    # The status lists no app container yet: two candidates, never a guess.
    assert "cannot tell the sandbox" in str(find_sandbox(pod(UID), index, {}))
    # Every container process belongs to a listed container.
    assert "no sandbox process" in str(find_sandbox(pod(UID, APP, PAUSE), index, {}))
    split = index_processes(
        [ProcessInfo(100, cgroupfs(UID, PAUSE), 1), ProcessInfo(101, cgroupfs(UID, PAUSE), 2)]
    )
    assert "2 network namespaces" in str(find_sandbox(pod(UID), split, {}))


def test_host_proc_reads_a_proc_tree_and_named_netns(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, cgroup in (("100", cgroupfs(UID, PAUSE)), ("5", "0::/init.scope\n")):
        (proc / pid / "ns").mkdir(parents=True)
        (proc / pid / "cgroup").write_text(cgroup)
        (proc / pid / "ns" / "net").write_text("")
    (proc / "self").mkdir()
    (proc / "300").mkdir()  # exited between listing and reading: skipped
    netns = tmp_path / "netns"
    netns.mkdir()
    (netns / "cni-1").write_text("")
    reader = HostProc(proc, netns)
    found = list(reader.processes())
    inode = (proc / "100" / "ns" / "net").stat().st_ino
    assert found == [ProcessInfo(100, cgroupfs(UID, PAUSE), inode)]
    assert reader.named_netns() == {(netns / "cni-1").stat().st_ino: str(netns / "cni-1")}
    assert HostProc(proc, tmp_path / "absent").named_netns() == {}
