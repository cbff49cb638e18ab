"""Fixtures of the Kubernetes tests: a real cluster in namespaces (removed afterwards whatever
happens), and the Weir image built from this checkout."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.k8s_cluster.cluster import Cluster, leftovers, up


@pytest.fixture(scope="module")
def k8s_cluster() -> Iterator[Cluster]:
    """Two nodes; state in a temp dir, so it never meets `make k8s-up`'s cluster.

    Teardown fails the test if anything of the cluster is left on the machine.
    """
    work = Path(tempfile.mkdtemp(prefix="wk8s-test-"))
    try:
        cluster = up(work / "k8s", node_count=2)  # removes what it made if it fails
        try:
            yield cluster
        finally:
            cluster.down()
            left = leftovers(cluster)
            assert not left, f"left behind after teardown: {left}"
    finally:
        work.rmdir()


@pytest.fixture(scope="module")
def weir_image() -> Iterator[Path]:
    """The node image (scripts/build-weir-image.sh): seconds once its base layer is cached."""
    work = Path(tempfile.mkdtemp(prefix="weir-image-"))
    archive = work / "weir.tar"
    try:
        subprocess.run(
            ["scripts/build-weir-image.sh", str(archive)],
            cwd=Path(__file__).resolve().parents[2],
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=1200,
        )
        yield archive
    finally:
        archive.unlink(missing_ok=True)
        work.rmdir()
