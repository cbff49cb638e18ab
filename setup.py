"""The one compiled part of the weir package; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "node_agent.proxy.http2._fastpath",
            ["node_agent/proxy/http2/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
