"""The agent's on-disk pod registry: round trips, corruption, failed writes."""

from __future__ import annotations

import os

import pytest

from node_agent.enrollment.registry import PodRecord, PodRegistry
from node_agent.redirect.config import CaptureConfig, parse_cidrs
from weir_common.errors import InvalidInputError


def record(uid: str, name: str = "app") -> PodRecord:
    return PodRecord(
        uid=uid,
        namespace="default",
        name=name,
        service_account="app",
        container_id=f"c-{uid}",
        netns=f"/var/run/netns/{uid}",
        netns_inode=4026532000,
        ips=("10.244.1.5/24", "fd00::5/64"),
        capture=CaptureConfig(
            exclude_outbound_ports=(22,),
            exclude_outbound_cidrs=parse_cidrs(["169.254.169.254"], "x"),
        ),
        mode="iptables",
    )


def test_a_new_agent_process_reads_what_the_old_one_wrote(tmp_path):
    path = tmp_path / "state" / "pods.json"
    first = PodRegistry(path)
    first.load()
    first.put(record("u1", "a"))
    first.put(record("u2", "b"))
    first.remove("u1")
    first.remove("never-enrolled")

    second = PodRegistry(path)
    second.load()
    assert list(second) == [record("u2", "b")]
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is unreadable"),
        ('{"version": 9, "pods": []}', "format version 9, expected 1"),
        ('{"version": 1, "pods": [{"uid": "x"}]}', "is unreadable: KeyError"),
    ],
)
def test_a_corrupt_registry_is_an_error_not_an_empty_node(tmp_path, content, message):
    path = tmp_path / "pods.json"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=message):
        PodRegistry(path).load()


def test_a_failed_write_changes_neither_disk_nor_memory(tmp_path, monkeypatch):
    path = tmp_path / "pods.json"
    registry = PodRegistry(path)
    registry.put(record("u1"))
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        registry.put(record("u2", "b"))
    assert path.read_bytes() == before
    assert [r.uid for r in registry] == ["u1"]
    assert [p.name for p in tmp_path.iterdir()] == ["pods.json"], "temp file left behind"
