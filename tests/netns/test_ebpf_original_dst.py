"""SO_ORIGINAL_DST in the eBPF mode, and the getsockopt program staying out of everything else.

The getsockopt program runs for every process on the node, so beside
answering for steered connections (outbound through connect4/6 + sockops,
inbound through sk_lookup) it must leave every other getsockopt exactly as
the kernel answered it: same values, same errors, large buffers included.
"""

from __future__ import annotations

import ctypes
import socket
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

import pytest

from node_agent import netns as netns_mod
from node_agent.constants import INBOUND_PLAINTEXT_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT
from node_agent.localmesh.topology import LocalTopology, Pod
from node_agent.proxy.original_dst import (
    IP6T_SO_ORIGINAL_DST,
    SO_ORIGINAL_DST,
    original_destination,
)
from node_agent.redirect.config import CaptureConfig
from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import BPFFS, PinLayout

pytestmark = pytest.mark.netns

APP_PORT = 8080


def listen(pod: Pod, family: socket.AddressFamily, port: int) -> socket.socket:
    with netns_mod.entered(pod.netns):
        s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(16)
    s.settimeout(3)
    return s


def dial(pod: Pod, family: socket.AddressFamily, address: str, port: int) -> socket.socket:
    with netns_mod.entered(pod.netns):
        s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect((address, port))
    return s


@dataclass
class Pods:
    a: Pod
    b: Pod
    listeners: dict[tuple[str, int], socket.socket]

    def accept(self, pod: str, family: int) -> socket.socket:
        conn, _ = self.listeners[(pod, family)].accept()
        return conn


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    pins = PinLayout(BPFFS / f"weirtest-{uuid.uuid4().hex[:8]}")
    with LocalTopology() as topo:
        node = topo.add_node("node-1", "10.244.1.0/24", "fd00:244:1::/64")
        a = topo.add_pod(node, "a", dual_stack=True)
        b = topo.add_pod(node, "b", dual_stack=True)
        listeners = {}
        for family, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            listeners[("A:out", family)] = listen(a, af, OUTBOUND_CAPTURE_PORT)
            listeners[("A:in", family)] = listen(a, af, INBOUND_PLAINTEXT_CAPTURE_PORT)
            listeners[("B:app", family)] = listen(b, af, APP_PORT)
        try:
            with EbpfCapture(pins) as capture:
                capture.apply(a.netns, CaptureConfig())
                yield Pods(a, b, listeners)
        finally:
            for s in listeners.values():
                s.close()
            loader.uninstall(pins)


@pytest.mark.parametrize("family", [4, 6])
def test_outbound_original_destination(pods, family):
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    dst = str(pods.b.ipv4 if family == 4 else pods.b.ipv6)
    with closing(dial(pods.a, af, dst, APP_PORT)), closing(pods.accept("A:out", family)) as conn:
        assert conn.getsockname()[1] == OUTBOUND_CAPTURE_PORT
        assert original_destination(conn) == (dst, APP_PORT)


def test_outbound_from_dual_stack_socket_to_ipv4(pods):
    """::ffff:a.b.c.d from an IPv6 socket is IPv4 on the wire: the IPv4 listener gets it."""
    dst = str(pods.b.ipv4)
    with (
        closing(dial(pods.a, socket.AF_INET6, f"::ffff:{dst}", APP_PORT)),
        closing(pods.accept("A:out", 4)) as conn,
    ):
        assert original_destination(conn) == (dst, APP_PORT)


@pytest.mark.parametrize("family", [4, 6])
def test_inbound_original_destination(pods, family):
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    dst = str(pods.a.ipv4 if family == 4 else pods.a.ipv6)
    with closing(dial(pods.b, af, dst, APP_PORT)), closing(pods.accept("A:in", family)) as conn:
        # sk_lookup rewrites nothing: the socket keeps the dialled address...
        assert conn.getsockname()[:2] == (dst, APP_PORT)
        # ...and SO_ORIGINAL_DST answers as it does under iptables.
        assert original_destination(conn) == (dst, APP_PORT)


_libc = ctypes.CDLL(None, use_errno=True)


def big_getsockopt(s: socket.socket, level: int, opt: int) -> tuple[int, int, int]:
    """(return value, errno, returned length) of a getsockopt with an 8 KiB buffer.

    Python's getsockopt refuses buffers over 1 KiB, so libc is called directly.
    """
    buf = ctypes.create_string_buffer(8192)
    size = ctypes.c_uint32(8192)
    ret = _libc.getsockopt(s.fileno(), level, opt, buf, ctypes.byref(size))
    return ret, ctypes.get_errno() if ret else 0, size.value


def _observe(pod: Pod) -> dict[str, object]:
    """Everything getsockopt says about a fresh, uncaptured connection in `pod`."""
    listener = listen(pod, socket.AF_INET, 18080)
    with (
        listener,
        closing(dial(pod, socket.AF_INET, "127.0.0.1", 18080)) as client,
        closing(listener.accept()[0]) as server,
    ):
        seen: dict[str, object] = {}
        for name, s in (("client", client), ("server", server)):
            seen[f"{name} rcvbuf"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            seen[f"{name} tos"] = s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS)
            seen[f"{name} nodelay"] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            # Past one page: the program never sees the whole buffer.
            seen[f"{name} tcp_info, 8 KiB buffer"] = big_getsockopt(
                s, socket.IPPROTO_TCP, socket.TCP_INFO
            )
            for level, opt, size in (
                (socket.SOL_IP, SO_ORIGINAL_DST, 16),
                (socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28),
            ):
                try:
                    seen[f"{name} original dst {level}"] = s.getsockopt(level, opt, size)
                except OSError as e:
                    seen[f"{name} original dst {level}"] = f"errno {e.errno}"
    return seen


def test_other_getsockopt_calls_are_untouched():
    """Same answers, same errors, with and without Weir's programs at the cgroup root."""
    pins = PinLayout(BPFFS / f"weirtest-{uuid.uuid4().hex[:8]}")
    with LocalTopology() as topo:
        node = topo.add_node("node-1", "10.244.1.0/24")
        a = topo.add_pod(node, "a")
        b = topo.add_pod(node, "b")
        before = {"captured": _observe(a), "other": _observe(b)}
        try:
            with EbpfCapture(pins) as capture:
                capture.apply(a.netns, CaptureConfig())
                after = {"captured": _observe(a), "other": _observe(b)}
        finally:
            loader.uninstall(pins)
    assert after == before
    assert isinstance(before["other"]["server original dst 0"], str), "uncaptured must fail"
