"""Enrollment orchestration: order, rollback, DEL, convergence (fake parts, real netns)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import uuid
from pathlib import Path

import pytest

from cni_plugin.protocol import PodInfo
from node_agent.enrollment.enroller import Enroller, EnrollmentError, MeshIntent
from node_agent.enrollment.registry import PodRecord, PodRegistry
from node_agent.netns import Netns
from node_agent.proxy_handoff.protocol import EnrolledPod
from node_agent.redirect.config import CaptureConfig
from weir_common.errors import NodeSetupError, TransientError

pytestmark = pytest.mark.netns


class Journal:
    """Every fake appends what it did here, so tests can assert on order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fail: dict[str, Exception] = {}

    def hit(self, event: str) -> None:
        self.events.append(event)
        if event in self.fail:
            raise self.fail[event]


class FakeCapture:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.drift: list[str] = []

    def apply(self, ns: Netns, config: CaptureConfig) -> None:
        self.journal.hit(f"capture.apply {ns.path.name}")
        self.drift = []

    def check(self, ns: Netns, config: CaptureConfig) -> list[str]:
        self.journal.hit(f"capture.check {ns.path.name}")
        return self.drift

    def remove(self, ns: Netns) -> None:
        self.journal.hit(f"capture.remove {ns.path.name}")

    def forget(self, netns_cookie: int) -> None:
        self.journal.hit(f"capture.forget {netns_cookie}")

    def prune(self) -> list[str]:
        self.journal.hit("capture.prune")
        return []


class FakeProxy:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def add(self, pod: EnrolledPod, netns: Netns) -> None:
        self.journal.hit(f"proxy.add {pod.uid} {','.join(pod.ips)}")

    async def remove(self, uid: str) -> None:
        self.journal.hit(f"proxy.remove {uid}")


class FakeRegistrar:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def register(self, record: PodRecord) -> None:
        self.journal.hit(f"register {record.uid}")

    async def deregister(self, record: PodRecord) -> None:
        self.journal.hit(f"deregister {record.uid}")


class Directory:
    def lookup(self, namespace: str, name: str) -> MeshIntent | str:
        if namespace == "kube-system":
            return "namespace kube-system is excluded"
        return MeshIntent(service_account=f"sa-{name}")


@pytest.fixture
def sandbox():
    name = f"weirt-e{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield f"/var/run/netns/{name}"
    subprocess.run(["ip", "netns", "del", name], check=False)


def make(tmp_path: Path) -> tuple[Enroller, Journal, PodRegistry]:
    """A fresh agent process: its registry is whatever the file says."""
    journal = Journal()
    registry = PodRegistry(tmp_path / "pods.json")
    registry.load()
    enroller = Enroller(
        capture=FakeCapture(journal),
        mode="fake",
        proxy=FakeProxy(journal),
        registrar=FakeRegistrar(journal),
        directory=Directory(),
        registry=registry,
    )
    return enroller, journal, registry


def pod(netns: str, namespace: str = "default") -> PodInfo:
    return PodInfo("cid-1", netns, "eth0", ("10.244.1.5/24",), namespace, "app", "uid-1")


def test_add_runs_every_step_in_order_and_records_the_pod(tmp_path, sandbox):
    enroller, journal, registry = make(tmp_path)
    outcome = asyncio.run(enroller.add(pod(sandbox)))
    ns = Path(sandbox).name
    assert outcome.captured
    assert journal.events == ["proxy.add uid-1 10.244.1.5", f"capture.apply {ns}", "register uid-1"]
    [record] = list(registry)
    assert (record.service_account, record.mode) == ("sa-app", "fake")


def test_excluded_pods_are_not_touched(tmp_path, sandbox):
    enroller, journal, registry = make(tmp_path)
    outcome = asyncio.run(enroller.add(pod(sandbox, namespace="kube-system")))
    assert outcome == (outcome.__class__(False, "namespace kube-system is excluded"))
    assert journal.events == []
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("failing", "undone", "retryable"),
    [
        ("proxy.add uid-1 10.244.1.5", [], True),
        ("capture.apply", ["proxy.remove uid-1"], False),
        ("register uid-1", ["capture.remove", "proxy.remove uid-1"], True),
    ],
)
def test_a_failed_step_undoes_the_earlier_ones(tmp_path, sandbox, failing, undone, retryable):
    enroller, journal, registry = make(tmp_path)
    ns = Path(sandbox).name
    key = f"{failing} {ns}" if failing == "capture.apply" else failing
    journal.fail[key] = (
        TransientError("proxy not ready") if retryable else NodeSetupError("no iptables")
    )
    with pytest.raises(EnrollmentError) as raised:
        asyncio.run(enroller.add(pod(sandbox)))
    assert raised.value.retryable is retryable
    assert "enrolling default/app failed at" in raised.value.message
    done = journal.events[journal.events.index(key) + 1 :]
    assert done == [f"{e} {ns}" if e == "capture.remove" else e for e in undone]
    assert len(registry) == 0


def test_delete_is_complete_and_idempotent(tmp_path, sandbox):
    enroller, journal, registry = make(tmp_path)
    asyncio.run(enroller.add(pod(sandbox)))
    journal.events.clear()
    asyncio.run(enroller.delete("cid-1"))
    assert journal.events == [
        f"capture.remove {Path(sandbox).name}",
        "proxy.remove uid-1",
        "deregister uid-1",
    ]
    assert len(registry) == 0
    journal.events.clear()
    asyncio.run(enroller.delete("cid-1"))
    assert journal.events == []


def test_delete_succeeds_when_parts_fail_or_the_netns_is_gone(tmp_path, sandbox):
    enroller, journal, registry = make(tmp_path)
    asyncio.run(enroller.add(pod(sandbox)))
    journal.events.clear()
    journal.fail["proxy.remove uid-1"] = TransientError("no proxy connected")
    cookie = next(iter(registry)).netns_cookie
    assert cookie > 0
    subprocess.run(["ip", "netns", "del", Path(sandbox).name], check=True)
    asyncio.run(enroller.delete("cid-1"))
    # Gone with the netns: its rules; not gone: what capture keeps under its cookie.
    assert journal.events == [f"capture.forget {cookie}", "proxy.remove uid-1", "deregister uid-1"]
    assert len(registry) == 0


def test_converge_repairs_drift_forgets_the_gone_and_reports_failures(tmp_path, sandbox):
    enroller, _, _ = make(tmp_path)
    asyncio.run(enroller.add(pod(sandbox)))
    ns = Path(sandbox).name

    restarted, journal2, _ = make(tmp_path)
    capture = restarted._capture
    assert isinstance(capture, FakeCapture)
    capture.drift = ["IPv4 nat/WEIR-OUTBOUND: chain missing"]
    asyncio.run(restarted.converge())
    assert journal2.events == [f"capture.check {ns}", f"capture.apply {ns}", "capture.prune"]
    assert [e[0] for e in restarted.enrolled()] == [
        EnrolledPod("uid-1", "app", "default", "sa-app", ("10.244.1.5",))
    ]

    capture.drift = ["drift"]
    journal2.fail[f"capture.apply {ns}"] = NodeSetupError("iptables-restore vanished")
    asyncio.run(restarted.converge())
    assert (
        restarted.dump()[0]["status"] == "capture could not be restored: iptables-restore vanished"
    )

    cookie = next(iter(restarted._registry)).netns_cookie
    subprocess.run(["ip", "netns", "del", ns], check=True)
    journal2.events.clear()
    asyncio.run(restarted.converge())
    assert journal2.events == [
        f"capture.forget {cookie}",
        "proxy.remove uid-1",
        "deregister uid-1",
        "capture.prune",
    ]
    assert restarted.enrolled() == []
    assert restarted.dump() == []


def test_gc_unenrolls_what_the_runtime_no_longer_has(tmp_path, sandbox):
    enroller, journal, registry = make(tmp_path)
    asyncio.run(enroller.add(pod(sandbox)))
    asyncio.run(enroller.gc(frozenset({"cid-1"})))
    assert len(registry) == 1
    asyncio.run(enroller.gc(frozenset({"some-other"})))
    assert len(registry) == 0
    assert journal.events[-1] == "deregister uid-1"


def test_prune_forgets_pods_whose_netns_went_away_without_a_del(tmp_path, sandbox):
    enroller, journal, registry = make(tmp_path)
    asyncio.run(enroller.add(pod(sandbox)))
    journal.events.clear()
    asyncio.run(enroller.prune())
    assert journal.events == ["capture.prune"]
    assert len(registry) == 1
    cookie = next(iter(registry)).netns_cookie
    subprocess.run(["ip", "netns", "del", Path(sandbox).name], check=True)
    journal.events.clear()
    asyncio.run(enroller.prune())
    assert journal.events == [
        f"capture.forget {cookie}",
        "proxy.remove uid-1",
        "deregister uid-1",
        "capture.prune",
    ]
    assert len(registry) == 0


def test_an_enrollment_cut_short_by_a_crash_is_undone_by_the_next_agent(tmp_path, sandbox):
    """The registry holds the ADD as in flight from before its first step."""
    enroller, _, registry = make(tmp_path)
    seen: list[bool] = []

    async def register_and_look(record: PodRecord) -> None:
        on_disk = PodRegistry(registry.path)
        on_disk.load()
        seen.extend(r.enrolled for r in on_disk)

    enroller._registrar.register = register_and_look  # type: ignore[method-assign]
    asyncio.run(enroller.add(pod(sandbox)))
    assert seen == [False]  # on disk while the ADD ran: what a crash would leave

    # Such a leftover, as a killed agent leaves it:
    record = next(iter(registry))
    registry.put(dataclasses.replace(record, enrolled=False))
    restarted, journal2, registry2 = make(tmp_path)
    asyncio.run(restarted.converge())
    ns = Path(sandbox).name
    assert journal2.events == [
        f"capture.remove {ns}",
        "proxy.remove uid-1",
        "deregister uid-1",
        "capture.prune",
    ]
    assert len(registry2) == 0
