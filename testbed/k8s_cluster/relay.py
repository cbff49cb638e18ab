"""The one thing of the cluster in the host's netns: a TCP relay to the API server.

`kubectl --kubeconfig build/k8s/kubeconfig` runs in the host's netns, where
nothing of the cluster is wired. This relay listens on a loopback port
there and, for each connection, opens one from inside the control-plane
netns to the API server, copying bytes both ways. TLS passes through
untouched, so clients verify the API server itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from ipaddress import IPv4Address

from node_agent.localmesh.topology import open_connection
from node_agent.netns import Netns

_CHUNK = 65536


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    # Half-close: the other direction may still have a response to finish.
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _serve(client: socket.socket, netns: Netns, address: IPv4Address, port: int) -> None:
    with client:
        try:
            upstream = open_connection(netns, address, port, timeout=10.0)
        except OSError:
            return
        with upstream:
            upstream.settimeout(None)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()


def serve_forever(listener: socket.socket, netns: Netns, address: IPv4Address, port: int) -> None:
    """Accept on `listener` until killed; one thread per direction of each connection."""
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve, args=(client, netns, address, port), daemon=True).start()
