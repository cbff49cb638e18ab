"""The eBPF mode's lifecycle in a real kernel: restart, sharing the cgroup root, uninstall, errors.

Each test installs under a pin root of its own (beside, never inside,
/sys/fs/bpf/weir) and removes it again whatever happens. The programs sit at
the cgroup v2 root, so they see every process on the machine; everything a
test connects to lives in namespaces the test made.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent import netns as netns_mod
from node_agent.constants import INBOUND_PLAINTEXT_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT
from node_agent.localmesh.topology import LocalTopology, Pod
from node_agent.localmesh.traffic import TrafficObserver, connect
from node_agent.proxy.original_dst import original_destination
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.ebpf import loader, sys_bpf
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import cgroup2_root
from node_agent.redirect.ebpf.sys_bpf import AttachType, ProgType
from weir_common.errors import NodeSetupError

pytestmark = pytest.mark.netns

WEIR = str(Path(sys.executable).with_name("weir"))
APP_PORT, EXCLUDED_LATER, FOREIGN_PORT = 8080, 9090, 7777


def weir(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WEIR, "--log-level", "error", *args], capture_output=True, text=True, env=env, check=False
    )


@pytest.fixture
def two_pods() -> Iterator[tuple[Pod, Pod]]:
    with LocalTopology() as topo:
        node = topo.add_node("node-1", "10.244.1.0/24")
        yield topo.add_pod(node, "a"), topo.add_pod(node, "b")


class EchoProxy:
    """Stands in for the proxy's outbound listener: echoes, and keeps connections open."""

    def __init__(self, pod: Pod) -> None:
        with netns_mod.entered(pod.netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", OUTBOUND_CAPTURE_PORT))
        self.sock.listen(64)
        self.original: list[tuple[str, int]] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.original.append(original_destination(conn))
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(1024):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


def dial(pod: Pod, address: str, port: int) -> socket.socket:
    with netns_mod.entered(pod.netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect((address, port))
    return s


def echoes(s: socket.socket) -> bool:
    s.sendall(b"ping")
    return s.recv(16) == b"ping"


def test_agent_restart_keeps_capture_and_live_connections(pins, two_pods):
    a, b = two_pods
    b_ip = str(b.ipv4)
    proxy = EchoProxy(a)
    with TrafficObserver() as seen:
        seen.listen(a.netns, "A:inbound-capture", INBOUND_PLAINTEXT_CAPTURE_PORT, ipv6=False)
        seen.listen(b.netns, "B:app", EXCLUDED_LATER, ipv6=False)
        root = ["--bpf-pin-root", str(pins.root), "--netns", str(a.netns.path)]

        first = weir("redirect", "apply", "--mode", "ebpf", *root)
        assert first.returncode == 0, first.stderr
        assert "installed at" in first.stdout
        live = dial(a, b_ip, APP_PORT)
        assert echoes(live)

        # No agent process exists now: capture must not depend on one.
        with contextlib.closing(dial(a, b_ip, APP_PORT)) as fresh:
            assert echoes(fresh)

        # New connections keep landing on the proxy while a new agent starts up.
        outcomes: list[bool] = []
        stop = threading.Event()

        def keep_connecting() -> None:
            while not stop.is_set():
                with contextlib.closing(dial(a, b_ip, APP_PORT)) as s:
                    outcomes.append(echoes(s))

        worker = threading.Thread(target=keep_connecting)
        worker.start()
        try:
            second = weir(
                "redirect", "apply", "--mode", "ebpf", "--exclude-outbound-ports", "9090", *root
            )
        finally:
            stop.set()
            worker.join()
        assert second.returncode == 0, second.stderr
        assert "already installed" in second.stdout, "a restarted agent must not reload"
        assert outcomes and all(outcomes)

        assert echoes(live), "a connection opened before the restart stopped flowing"
        assert set(proxy.original) == {(b_ip, APP_PORT)}
        # The new process re-opened the pinned maps and changed the config through them.
        assert seen.wait_for(connect(a.netns, b_ip, EXCLUDED_LATER).token).listener == "B:app"
        inbound = connect(b.netns, str(a.ipv4), APP_PORT)
        assert seen.wait_for(inbound.token).listener == "A:inbound-capture"
        live.close()
    proxy.close()
    removed = weir("redirect", "uninstall-ebpf", "--bpf-pin-root", str(pins.root))
    assert removed.returncode == 0, removed.stderr
    assert not pins.root.exists()


FOREIGN = r"""
BPF_ARRAY(hits, u64, 1);

int count_connects(struct bpf_sock_addr *ctx)
{
    int zero = 0;
    u64 *hit = hits.lookup(&zero);
    if (hit && ctx->user_port == bpf_htons(PORT))
        __sync_fetch_and_add(hit, 1);
    return 1;
}
"""


@contextlib.contextmanager
def foreign_connect4_counter() -> Iterator[object]:
    """Someone else's cgroup/connect4 program at the root, attached the classic way
    (BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI), counting connects to FOREIGN_PORT."""
    from bcc import BPF  # noqa: PLC0415 - only this test needs bcc directly

    os.environ["BCC_KERNEL_SOURCE"] = str(loader.kernel_source())
    bpf = BPF(text=FOREIGN.replace("PORT", str(FOREIGN_PORT)).encode())
    fn = bpf.load_func(
        b"count_connects", ProgType.CGROUP_SOCK_ADDR, attach_type=AttachType.CGROUP_INET4_CONNECT
    )
    cgroup_fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    allow_multi = 2
    BPF.attach_func(fn, cgroup_fd, AttachType.CGROUP_INET4_CONNECT, allow_multi)
    try:
        yield lambda: bpf[b"hits"][0].value
    finally:
        BPF.detach_func(fn, cgroup_fd, AttachType.CGROUP_INET4_CONNECT)
        os.close(cgroup_fd)
        bpf.cleanup()


def test_coexists_with_another_connect4_program_at_the_root(pins, two_pods):
    a, b = two_pods
    with TrafficObserver() as seen, foreign_connect4_counter() as hits:
        seen.listen(a.netns, "A:outbound-capture", OUTBOUND_CAPTURE_PORT, ipv6=False)
        seen.listen(b.netns, "B:foreign-port", FOREIGN_PORT, ipv6=False)

        def land(src: Pod, dst: Pod) -> str | None:
            arrival = seen.wait_for(connect(src.netns, str(dst.ipv4), FOREIGN_PORT).token)
            return arrival.listener if arrival else None

        assert land(a, b) == "B:foreign-port"
        assert hits() == 1
        with EbpfCapture(pins) as capture:
            capture.apply(a.netns, CaptureConfig())
            # Theirs, attached first, runs first and still sees the real destination;
            # ours then captures. An uncaptured pod is theirs alone.
            assert land(a, b) == "A:outbound-capture"
            assert hits() == 2
            assert land(b, b) == "B:foreign-port"
            assert hits() == 3
        loader.uninstall(pins)
        assert land(a, b) == "B:foreign-port"
        assert hits() == 4


def bpftool(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout or "[]"))


def test_uninstall_leaves_no_pin_link_program_or_map(pins, two_pods):
    a, b = two_pods
    with TrafficObserver() as seen:
        seen.listen(a.netns, "A:inbound-capture", INBOUND_PLAINTEXT_CAPTURE_PORT, ipv6=False)
        seen.listen(b.netns, "B:app", APP_PORT, ipv6=False)
        with EbpfCapture(pins) as capture:
            capture.apply(a.netns, CaptureConfig())
        ids: dict[str, set[int]] = {"prog": set(), "link": set(), "map": set()}
        for pin in pins.all_pins():
            fd = sys_bpf.obj_get(str(pin))
            try:
                if pin.parent.name == "maps":
                    ids["map"].add(sys_bpf.map_info(fd).id)
                elif pin.parent.name == "progs":
                    ids["prog"].add(sys_bpf.prog_info(fd).id)
                else:
                    link = sys_bpf.link_info(fd)
                    ids["link"].add(link.id)
                    ids["prog"].add(link.prog_id)
            finally:
                os.close(fd)
        assert len(ids["link"]) == 5  # four at the cgroup root, one in pod A
        assert len(ids["map"]) == 8  # seven for the programs, weir_meta

        removed = weir("redirect", "uninstall-ebpf", "--bpf-pin-root", str(pins.root))
        assert removed.returncode == 0, removed.stderr
        assert not pins.root.exists()
        deadline = time.monotonic() + 5
        while True:  # the kernel frees programs and maps after an RCU grace period
            left = {kind: ids[kind] & {o["id"] for o in bpftool(kind, "show")} for kind in ids}
            if not any(left.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert left == {"prog": set(), "link": set(), "map": set()}
        assert seen.wait_for(connect(a.netns, str(b.ipv4), APP_PORT).token).listener == "B:app"


def test_missing_kernel_headers_are_named_and_auto_falls_back(pins, bare_netns):
    env = {**os.environ, loader.KERNEL_SOURCE_ENV: "/nonexistent/headers"}
    root = ["--bpf-pin-root", str(pins.root)]
    pre = weir("redirect", "preflight", *root, env=env)
    assert pre.returncode == 1
    assert "FAIL kernel headers for bcc: kernel headers for bcc not found" in pre.stdout
    assert "make deps" in pre.stdout

    ebpf = weir(
        "redirect", "apply", "--mode", "ebpf", "--netns", str(bare_netns.path), *root, env=env
    )
    assert ebpf.returncode == 1
    assert ebpf.stderr.count("\n") == 1, ebpf.stderr
    assert "eBPF mode requested, but this node cannot run it: kernel headers" in ebpf.stderr
    assert not pins.root.exists()

    auto = weir(
        "redirect", "apply", "--mode", "auto", "--netns", str(bare_netns.path), *root, env=env
    )
    assert auto.returncode == 0, auto.stderr
    assert "mode: iptables (auto: eBPF preflight failed (kernel headers for bcc" in auto.stdout
    assert weir("redirect", "remove", "--netns", str(bare_netns.path)).returncode == 0


BAD_CTX_ACCESS = r"""
int bad(struct bpf_sock_addr *ctx)
{
    return *(u32 *)((char *)ctx + 4000);
}
"""
NO_SUCH_HELPER_HERE = r"""
int bad(struct bpf_sk_lookup *ctx)
{
    return bpf_get_netns_cookie(ctx) ? SK_PASS : SK_DROP;
}
"""


@pytest.mark.parametrize(
    ("text", "prog_type", "attach", "said"),
    [
        (
            BAD_CTX_ACCESS,
            ProgType.CGROUP_SOCK_ADDR,
            AttachType.CGROUP_INET4_CONNECT,
            "invalid bpf_context access",
        ),
        (
            NO_SUCH_HELPER_HERE,
            ProgType.SK_LOOKUP,
            AttachType.SK_LOOKUP,
            "the running kernel lacks a helper this program needs",
        ),
        ("int bad(struct bpf_sock_addr *ctx) { return nope; }", 0, 0, "undeclared identifier"),
    ],
    ids=["verifier", "helper", "compiler"],
)
def test_load_failures_quote_the_compiler_or_verifier(text, prog_type, attach, said):
    program = loader.Program("bad", "unused.c", prog_type, attach, node_wide=True)
    with pytest.raises(NodeSetupError) as failure:
        loader.compile_and_load((program,), text=text)
    assert said in failure.value.message


def test_partial_install_with_pods_linked_is_refused_with_what_is_missing(pins):
    loader.install(pins)
    # Any pinned object under pods/ stands for a pod's sk_lookup link.
    prog = sys_bpf.obj_get(str(pins.prog(loader.SK_LOOKUP.func)))
    try:
        sys_bpf.obj_pin(prog, str(pins.pod_link(4242)))
    finally:
        os.close(prog)
    pins.link("weir_sockops").unlink()
    with pytest.raises(
        NodeSetupError, match=r"partial eBPF install .*\(missing: links/weir_sockops\) with pods"
    ):
        loader.install(pins)


def test_partial_install_no_pod_depends_on_is_replaced(pins):
    # What an install killed after pinning its maps leaves.
    loader.install(pins)
    for p in loader.PROGRAMS:
        (pins.link(p.func) if p.node_wide else pins.prog(p.func)).unlink()
    assert not loader.install_state(pins).installed
    assert loader.install(pins).installed_now
    assert loader.install_state(pins).installed
