"""The compiled parts of the weir package; everything else is in pyproject.toml.

Two kinds: C written by hand (the HTTP/2 DATA path, two socket calls, TLS reads), and
the node proxy's per-connection Python compiled by mypyc from the same,
unchanged source. The Python stays the source of truth and runs as it is
where the compiled module is absent (a source checkout before `make`);
compiled, a new connection costs the proxies about a tenth less CPU
(docs/proxy.md, "Where the time goes").
"""

import os

from mypyc.build import mypycify
from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra"]

# Kept in step with tests/unit/test_compiled_modules.py, which checks that what
# is imported is compiled from the source beside it.
COMPILED = [
    "node_agent/proxy/access_log_writer.py",
    "node_agent/proxy/connections.py",
    "node_agent/proxy/hbone.py",
    "node_agent/proxy/http2/connection.py",
    "node_agent/proxy/http2/frames.py",
    "node_agent/proxy/http2/hpack.py",
    "node_agent/proxy/inbound.py",
    "node_agent/proxy/outbound.py",
    "node_agent/proxy/pieces.py",
    "node_agent/proxy/pool.py",
    "node_agent/proxy/routing.py",
    "node_agent/proxy/telemetry.py",
    "node_agent/proxy/tls_transport.py",
]


def compiled_python() -> list[Extension]:
    if os.environ.get("WEIR_PURE_PYTHON") == "1":
        # The venv's first install (Makefile): mypyc type-checks against the
        # packages that install brings, so it compiles in the next step.
        return []
    return mypycify(COMPILED, opt_level="3", group_name="node_agent_proxy_compiled")


setup(
    ext_modules=[
        Extension(
            "node_agent.proxy.http2._fastpath",
            ["node_agent/proxy/http2/_fastpath.c"],
            extra_compile_args=FLAGS,
        ),
        Extension(
            "node_agent.proxy._socket_calls",
            ["node_agent/proxy/_socket_calls.c"],
            extra_compile_args=FLAGS,
        ),
        Extension(
            "node_agent.proxy._tls_reads",
            ["node_agent/proxy/_tls_reads.c"],
            extra_compile_args=FLAGS,
        ),
        *compiled_python(),
    ]
)
