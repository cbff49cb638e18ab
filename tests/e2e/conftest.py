"""A real container runtime for end-to-end tests: containerd + runc, fully private.

containerd gets its own root, state, socket and config (no CRI plugin) in a
temp directory; the test image is built by testbed.images from Debian's busybox-static
(no registry is reachable) and imported. `ctr run --cni` reads only
/etc/cni/net.d and /opt/cni/bin, so each `ctr` runs under `ip netns exec NODE`
(its plugins then build the bridge inside the node's netns, never the host's)
and, in the private mount namespace that `ip netns exec` already gives it,
sees the test's conf and bin dirs mounted at those two paths. The host's
/etc and /opt are never written: an overlay makes /etc/cni appear for that
one process only.

What containerd insists on creating under /run/containerd (the shim socket
directory, whatever paths ctr cannot redirect) is removed afterwards if it was
not there before.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent.localmesh.topology import LocalTopology, Node
from testbed.images import build_busybox_image

REPO = Path(__file__).resolve().parents[2]
IMAGE = "weir.test/busybox:e2e"
RUN_CONTAINERD = Path("/run/containerd")


@dataclass
class Containerd:
    """A running private containerd; `run()` starts a container with CNI from a node netns."""

    work: Path
    address: Path
    namespace: str
    process: subprocess.Popen[bytes]

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.address), "--namespace", self.namespace, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def argv(
        self, node: Node, name: str, command: str, *, conf_dir: Path, bin_dir: Path
    ) -> list[str]:
        """`ctr run --cni --rm` in the node's netns with conf/bin dirs at the standard paths.

        The CNI container id the plugins see is `<namespace>-<name>`.
        """
        overlay = self.work / f"etc-overlay-{self.namespace}-{name}"
        (overlay / "upper").mkdir(parents=True)
        (overlay / "work").mkdir()
        ctr = [
            "ctr",
            "--address",
            str(self.address),
            "--namespace",
            self.namespace,
            "run",
            "--cni",
            "--rm",
            "--fifo-dir",
            str(self.work / "fifo"),
            "--runc-root",
            str(self.work / "runc"),
            IMAGE,
            name,
            "sh",
            "-c",
            command,
        ]
        setup = " && ".join(
            [
                f"mount -t overlay overlay -o lowerdir=/etc,upperdir={overlay}/upper,"
                f"workdir={overlay}/work /etc",
                "mkdir -p /etc/cni/net.d",
                f"mount --bind {shlex.quote(str(conf_dir))} /etc/cni/net.d",
                "mount -t tmpfs tmpfs /opt",
                "mkdir -p /opt/cni/bin",
                f"mount --bind {shlex.quote(str(bin_dir))} /opt/cni/bin",
                'exec "$@"',
            ]
        )
        return ["ip", "netns", "exec", node.netns_name, "sh", "-c", setup, "sh", *ctr]

    def run(
        self, node: Node, name: str, command: str, *, conf_dir: Path, bin_dir: Path
    ) -> subprocess.CompletedProcess[str]:
        """Run a container to completion (see `argv`)."""
        return subprocess.run(
            self.argv(node, name, command, conf_dir=conf_dir, bin_dir=bin_dir),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"containerd exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"containerd did not create {path} within {timeout_s:g} s")
        time.sleep(0.05)


def _our_shims(address: Path) -> list[int]:
    """Shims of our containerd (their command line names its socket)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"containerd-shim" in argv[0] and os.fsencode(address) in argv:
                pids.append(int(proc.name))
    return pids


def _unmount_under(root: Path) -> None:
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, timeout=10)


@pytest.fixture(scope="session")
def plugin_bundle() -> Path:
    """The weir-cni bundle: C front end + frozen Python plugin (rebuilt when its sources change)."""
    subprocess.run(["scripts/build-cni-plugin.sh"], cwd=REPO, check=True, timeout=300)
    return REPO / "build" / "cni-plugin" / "weir-cni"


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    """A private containerd with the test image imported; everything removed afterwards."""
    made_by_containerd = [RUN_CONTAINERD, *(RUN_CONTAINERD / d for d in ("s", "fifo", "runc"))]
    existed = {p: p.exists() for p in made_by_containerd}
    shim_dir = RUN_CONTAINERD / "s"
    shim_sockets_before = set(shim_dir.iterdir()) if shim_dir.is_dir() else set()
    work = Path(tempfile.mkdtemp(prefix="weire2e-"))
    address = work / "containerd.sock"
    config = work / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{work}/root"\n'
        f'state = "{work}/state"\n'
        "disabled_plugins = [\n"
        '  "io.containerd.grpc.v1.cri",\n'
        '  "io.containerd.snapshotter.v1.aufs",\n'
        '  "io.containerd.snapshotter.v1.btrfs",\n'
        '  "io.containerd.snapshotter.v1.zfs",\n'
        '  "io.containerd.snapshotter.v1.devmapper",\n'
        "]\n"
        "[grpc]\n"
        f'  address = "{address}"\n'
    )
    log = (work / "containerd.log").open("wb")
    process = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=log, stderr=log, process_group=0
    )
    runtime = Containerd(work, address, f"weir-e2e-{secrets.token_hex(3)}", process)
    try:
        _wait_for_socket(address, process, 20)
        build_busybox_image(work / "image.tar", IMAGE)
        imported = runtime.ctr("images", "import", str(work / "image.tar"))
        assert imported.returncode == 0, imported.stderr
        yield runtime
    finally:
        for pid in _our_shims(address):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        # A shim killed before its task was deleted leaves its socket behind.
        if shim_dir.is_dir():
            for sock in set(shim_dir.iterdir()) - shim_sockets_before:
                sock.unlink(missing_ok=True)
        _unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
        for path in sorted(existed, key=lambda p: len(p.parts), reverse=True):
            if not existed[path] and path.exists():
                with contextlib.suppress(OSError):  # not empty: someone else's now
                    path.rmdir()


@pytest.fixture
def node() -> Iterator[Node]:
    """A node netns of a fresh topology (the bridge the plugins build lives in it)."""
    with LocalTopology() as topology:
        yield topology.add_node("n1", "10.244.7.0/24")
