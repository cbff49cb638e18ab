"""The proxy's entrypoint drops to UID/GID 1337 and can still do its job in a pod netns."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from node_agent.constants import OUTBOUND_CAPTURE_PORT, PROXY_GID, PROXY_MARK, PROXY_UID
from node_agent.netns import entered

pytestmark = pytest.mark.netns

# Imports happen before the drop: the checkout need not be readable by 1337.
CHILD = r"""
import json, os, socket, sys
from node_agent.netns import Netns
from node_agent.proxy import privileges
from node_agent.proxy.sockets import NetnsSocketFactory

netns = Netns.validate(sys.argv[1])
privileges.drop_to(1337, 1337)
listener = NetnsSocketFactory().listener(netns, socket.AF_INET, int(sys.argv[2]))
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw = "allowed"
except PermissionError:
    raw = "refused"
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "ambient": privileges.ambient_capabilities(),
    "mark": listener.getsockopt(socket.SOL_SOCKET, socket.SO_MARK),
    "raw_socket": raw,
}), flush=True)
listener.settimeout(10)
conn, _ = listener.accept()
conn.sendall(b"served by uid %d" % os.getuid())
conn.close()
"""


def test_dropped_process_enters_pod_netns_marks_and_listens(bare_netns):
    with entered(bare_netns):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(bare_netns.path), str(OUTBOUND_CAPTURE_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        report = json.loads(child.stdout.readline() or "{}")
        assert report, child.stderr.read() if child.stderr else ""
        assert (report["uid"], report["euid"], report["gid"]) == (PROXY_UID, PROXY_UID, PROXY_GID)
        assert report["groups"] == []
        assert report["ambient"] == (1 << 12) | (1 << 21)  # CAP_NET_ADMIN | CAP_SYS_ADMIN
        assert report["mark"] == PROXY_MARK
        assert report["raw_socket"] == "refused"  # nothing beyond the two capabilities
        with entered(bare_netns):
            client = socket.create_connection(("127.0.0.1", OUTBOUND_CAPTURE_PORT), timeout=5)
        with client:
            assert client.recv(64) == b"served by uid 1337"
    finally:
        child.kill()
        child.wait(timeout=5)
