"""The compiled parts of the weir package; everything else is in pyproject.toml."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra"]

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
    ]
)
