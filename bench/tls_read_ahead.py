"""What OpenSSL's read-ahead buffer size costs a TLS reader (run by hand, not a test).

    .venv/bin/python bench/tls_read_ahead.py [--mib 1024] [--runs 3] [--sizes 0,262144,65536]

One TLS 1.3 stream (AES-128-GCM, as the proxies negotiate) over a socketpair:
a thread writes 256 KiB at a time, and this thread reads with the ssl
module's own SSL object, as tls_transport does, into a 256 KiB buffer. For
each read-ahead size (0: none), it prints the reader's CPU time per MiB
(time.thread_time) over --runs runs, and SSL_read calls per MiB.

Why it matters (tls_transport.READ_AHEAD): before each record OpenSSL moves
whatever it holds beyond that record to the front of its buffer, so a large
read-ahead copies the bytes one read brings several times over, while none
at all costs two syscalls per record.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from controlplane.ca import generate_root
from node_agent.proxy import tls_transport

CHUNK = 256 * 1024
_SSL_CTRL_SET_READ_AHEAD = 41


def contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert_pem, key_pem = generate_root("bench.local", now=datetime.datetime.now(datetime.UTC))
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        why_not = tls_transport.order_tls13_suites(context)
        if why_not is not None:
            raise SystemExit(f"cannot order TLS 1.3 suites: {why_not}")
    return server, client


def set_read_ahead(context: ssl.SSLContext, size: int) -> None:
    reached = tls_transport._reach_ssl_ctx(context)
    if isinstance(reached, str):
        raise SystemExit(f"cannot reach the SSL_CTX: {reached}")
    libssl, address = reached
    libssl.SSL_CTX_ctrl(address, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    libssl.SSL_CTX_set_default_read_buffer_len(address, size)


def one_run(server: ssl.SSLContext, client: ssl.SSLContext, mib: int) -> tuple[float, float]:
    """(reader CPU ms per MiB, SSL_read calls per MiB) for one stream of `mib` MiB."""
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    failure: list[BaseException] = []

    def write() -> None:
        try:
            with server.wrap_socket(theirs, server_side=True) as tls:
                chunk = b"x" * CHUNK
                for _ in range(mib * (1 << 20) // CHUNK):
                    tls.sendall(chunk)
        except BaseException as e:  # reported by the reader
            failure.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    with client.wrap_socket(ours) as tls:
        ssl_object = tls._sslobj
        assert ssl_object is not None
        view = memoryview(bytearray(CHUNK))
        wanted, got, calls = mib << 20, 0, 0
        started = time.thread_time()
        while got < wanted:
            n = ssl_object.read(CHUNK, view)
            calls += 1
            if n == 0:
                break
            got += n
        cpu = time.thread_time() - started
    writer.join(timeout=60)
    if failure:
        raise failure[0]
    if got < wanted:
        raise SystemExit(f"stream ended after {got} of {wanted} bytes")
    return cpu * 1000 / mib, calls / mib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB per run (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument(
        "--sizes",
        default="0,262144,131072,65536,49152,34816",
        help="read-ahead buffer sizes in bytes, comma-separated; 0 is none",
    )
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"{ssl.OPENSSL_VERSION}; {args.mib} MiB per run, {args.runs} runs; median (min..max)")
    with tempfile.TemporaryDirectory() as directory:
        for size in sizes:
            server, client = contexts(Path(directory))
            if size:
                set_read_ahead(client, size)
            runs = [one_run(server, client, args.mib) for _ in range(args.runs)]
            cpu = [run[0] for run in runs]
            label = f"{size // 1024} KiB" if size else "none"
            print(
                f"read-ahead {label:>8}: reader CPU {statistics.median(cpu):.3f} ms/MiB "
                f"({min(cpu):.3f}..{max(cpu):.3f}), SSL_read calls {runs[0][1]:.0f}/MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
