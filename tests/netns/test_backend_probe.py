"""Backend detection against real rulesets: run the probe inside a scratch netns."""

from __future__ import annotations

import subprocess

import pytest

from node_agent import netns as netns_mod
from node_agent.redirect.backend import Backend, choose_backend, probe_host

pytestmark = pytest.mark.netns


def _probe(ns: netns_mod.Netns) -> dict[Backend, int | None]:
    with netns_mod.entered(ns):
        return probe_host()


@pytest.mark.parametrize("backend", list(Backend))
def test_probe_counts_rules_where_they_are(bare_netns, backend):
    assert _probe(bare_netns) == {Backend.NFT: 0, Backend.LEGACY: 0}
    for rule in (["-A", "INPUT", "-j", "ACCEPT"], ["-t", "nat", "-A", "OUTPUT", "-j", "RETURN"]):
        proc = netns_mod.run(bare_netns, [f"iptables-{backend}", *rule])
        assert proc.returncode == 0, proc.stderr
    proc = netns_mod.run(bare_netns, [f"ip6tables-{backend}", "-A", "OUTPUT", "-j", "ACCEPT"])
    assert proc.returncode == 0, proc.stderr

    counts = _probe(bare_netns)
    other = Backend.LEGACY if backend == Backend.NFT else Backend.NFT
    assert counts == {backend: 3, other: 0}
    choice = choose_backend(None, counts)
    assert choice.backend == backend
    assert "3 rules" in choice.reason


def test_probe_does_not_create_legacy_tables(bare_netns):
    _probe(bare_netns)
    with netns_mod.entered(bare_netns), open("/proc/thread-self/net/ip_tables_names") as f:
        assert f.read() == ""


def test_probe_reads_each_netns_afresh(bare_netns, tmp_path):
    """python-iptables caches tables per process; a second netns must not see the first's."""
    second = netns_mod.Netns.validate(_second_netns(tmp_path))
    try:
        for rule in (["-A", "INPUT", "-j", "ACCEPT"], ["-A", "OUTPUT", "-j", "ACCEPT"]):
            assert netns_mod.run(bare_netns, ["iptables-legacy", *rule]).returncode == 0
        assert (
            netns_mod.run(second, ["iptables-legacy", "-A", "INPUT", "-j", "DROP"]).returncode == 0
        )
        assert _probe(bare_netns)[Backend.LEGACY] == 2
        assert _probe(second)[Backend.LEGACY] == 1
    finally:
        subprocess.run(["ip", "netns", "del", second.path.name], check=False)


def _second_netns(tmp_path) -> str:
    name = f"weirt-{tmp_path.name[-12:]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return f"/var/run/netns/{name}"
