"""The iptables engine against real namespaces, on both backends."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent import netns as netns_mod
from node_agent.netns import Netns
from node_agent.redirect.backend import Backend
from node_agent.redirect.config import CaptureConfig, parse_cidrs
from node_agent.redirect.iptables import IptablesCapture, RestoreError

pytestmark = pytest.mark.netns

WEIR = str(Path(sys.executable).with_name("weir"))
CONFIG = CaptureConfig(
    exclude_outbound_ports=(22,),
    exclude_outbound_cidrs=parse_cidrs(["10.96.0.0/12,fd00::/8"], "x"),
)
FOREIGN = {
    4: [
        "-t nat -A OUTPUT -d 1.2.3.4 -p tcp -j REDIRECT --to-ports 9999",
        "-t nat -N KUBE-SERVICES",
        "-t nat -A PREROUTING -j KUBE-SERVICES",
        "-A INPUT -p udp --dport 53 -j ACCEPT",
    ],
    6: [
        "-t nat -A OUTPUT -d 2001:db8::4 -p tcp -j REDIRECT --to-ports 9999",
        "-A INPUT -p udp --dport 53 -j ACCEPT",
    ],
}


def save(ns: Netns, backend: Backend) -> str:
    """Both families' rulesets, minus the timestamped comment lines."""
    text = ""
    for binary in (f"iptables-{backend}-save", f"ip6tables-{backend}-save"):
        proc = netns_mod.run(ns, [binary])
        assert proc.returncode == 0, proc.stderr
        text += "".join(
            line + "\n" for line in proc.stdout.splitlines() if not line.startswith("#")
        )
    return text


def add_foreign_rules(ns: Netns, backend: Backend) -> None:
    for family, rules in FOREIGN.items():
        binary = f"{'ip6tables' if family == 6 else 'iptables'}-{backend}"
        for rule in rules:
            proc = netns_mod.run(ns, [binary, *rule.split()])
            assert proc.returncode == 0, proc.stderr


@pytest.fixture(params=list(Backend))
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param)


def test_apply_check_reapply_remove_round_trip(bare_netns, backend):
    add_foreign_rules(bare_netns, backend)
    before = save(bare_netns, backend)
    capture = IptablesCapture(backend)

    report = capture.apply(bare_netns, CONFIG)
    assert report.changed == {4: True, 6: True}
    assert capture.check(bare_netns, CONFIG) == []
    applied = save(bare_netns, backend)
    assert "WEIR-OUTBOUND" in applied

    assert capture.apply(bare_netns, CONFIG).changed == {4: False, 6: False}
    assert save(bare_netns, backend) == applied, "re-apply must not touch the kernel"

    assert capture.remove(bare_netns) is True
    assert save(bare_netns, backend) == before, "remove must restore the ruleset byte for byte"
    assert capture.remove(bare_netns) is False


def test_remove_on_a_fresh_netns_leaves_only_empty_tables(bare_netns, backend):
    capture = IptablesCapture(backend)
    capture.apply(bare_netns, CaptureConfig())
    capture.remove(bare_netns)
    after = save(bare_netns, backend)
    assert "WEIR" not in after
    assert not [line for line in after.splitlines() if line.startswith("-A")]


def test_check_sees_drift_and_apply_repairs_it(bare_netns, backend):
    capture = IptablesCapture(backend)
    capture.apply(bare_netns, CONFIG)
    proc = netns_mod.run(
        bare_netns, [f"iptables-{backend}", "-t", "nat", "-D", "WEIR-OUTBOUND", "1"]
    )
    assert proc.returncode == 0, proc.stderr
    drift = capture.check(bare_netns, CONFIG)
    assert any("IPv4 nat/WEIR-OUTBOUND: rules differ" in line for line in drift)
    assert capture.check(bare_netns, CaptureConfig()) != []
    assert capture.apply(bare_netns, CONFIG).changed == {4: True, 6: False}
    assert capture.check(bare_netns, CONFIG) == []


def test_switching_backend_removes_our_rules_from_the_other(bare_netns, backend):
    other = Backend.LEGACY if backend == Backend.NFT else Backend.NFT
    IptablesCapture(other).apply(bare_netns, CONFIG)
    capture = IptablesCapture(backend)
    assert any("also present in iptables" in line for line in capture.check(bare_netns, CONFIG))
    report = capture.apply(bare_netns, CONFIG)
    assert report.cleaned_other_backend == [4, 6]
    assert "WEIR" not in save(bare_netns, other)
    assert capture.check(bare_netns, CONFIG) == []


def test_failed_ipv6_write_rolls_ipv4_back(bare_netns, backend, tmp_path, monkeypatch):
    add_foreign_rules(bare_netns, backend)
    before = save(bare_netns, backend)
    broken = tmp_path / f"ip6tables-{backend}-restore"
    broken.write_text("#!/bin/sh\necho 'ip6tables-restore: line 2 failed' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(RestoreError, match="line 2 failed"):
        IptablesCapture(backend).apply(bare_netns, CONFIG)
    assert save(bare_netns, backend) == before


def run_weir(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WEIR, *args], capture_output=True, text=True, env=env, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exclude-outbound-ports", "22,http"], "--exclude-outbound-ports: 'http' is not a TCP"),
        (["--exclude-inbound-ports", "70000"], "--exclude-inbound-ports: 70000 is not a TCP port"),
        (["--exclude-outbound-cidrs", "10.0.0.1/8"], "'10.0.0.1/8' is not a valid CIDR"),
        (["--exclude-outbound-cidrs", "300.1.1.1"], "'300.1.1.1' is not a valid CIDR"),
    ],
)
def test_cli_bad_input_is_one_line_and_changes_nothing(bare_netns, args, message):
    before = save(bare_netns, Backend.NFT)
    proc = run_weir("redirect", "apply", "--netns", str(bare_netns.path), *args)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""
    assert save(bare_netns, Backend.NFT) == before


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/var/run/netns/weir-no-such-netns", "does not exist"),
        ("/etc/hostname", "is not a namespace file"),
        ("/proc/self/ns/uts", "is a namespace, but not a network namespace"),
        ("/proc/self/ns/net", "is the network namespace Weir itself runs in"),
    ],
)
def test_cli_refuses_what_is_not_a_pod_netns(path, message):
    host_before = subprocess.run(
        ["iptables-nft-save"], capture_output=True, text=True, check=True
    ).stdout
    proc = run_weir("redirect", "apply", "--netns", path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    host_after = subprocess.run(
        ["iptables-nft-save"], capture_output=True, text=True, check=True
    ).stdout
    strip = lambda t: [line for line in t.splitlines() if not line.startswith("#")]  # noqa: E731
    assert strip(host_after) == strip(host_before)


def test_cli_without_iptables_binaries(bare_netns, tmp_path):
    before = save(bare_netns, Backend.NFT)
    env = {"PATH": str(tmp_path)}
    proc = run_weir("redirect", "apply", "--netns", str(bare_netns.path), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "weir: error: no usable iptables backend: neither iptables-nft nor iptables-legacy "
        "works (install the iptables package)"
    )
    forced = run_weir(
        "redirect", "apply", "--netns", str(bare_netns.path), "--iptables-backend", "nft", env=env
    )
    assert "iptables backend nft was requested but is not usable" in forced.stderr
    assert save(bare_netns, Backend.NFT) == before


def test_cli_apply_check_remove(bare_netns):
    ns = str(bare_netns.path)
    dry = run_weir(
        "redirect", "apply", "--netns", ns, "--dry-run", "--exclude-outbound-ports", "22"
    )
    assert dry.returncode == 0, dry.stderr
    assert "-A WEIR-OUTBOUND -p tcp -m tcp --dport 22" in dry.stdout
    assert "WEIR" not in save(bare_netns, Backend.NFT), "--dry-run changed the netns"

    check = run_weir("redirect", "check", "--netns", ns)
    assert check.returncode == 1
    assert "nat/WEIR-OUTBOUND: chain missing" in check.stdout

    applied = run_weir("redirect", "apply", "--netns", ns, "--exclude-outbound-ports", "22")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.startswith("backend: iptables-")
    assert "IPv4: applied" in applied.stdout
    check = run_weir("redirect", "check", "--netns", ns, "--exclude-outbound-ports", "22")
    assert (check.returncode, check.stdout.splitlines()[-1]) == (0, "capture rules: as expected")
    # Checking against other exclusions than were applied is drift, not success.
    assert run_weir("redirect", "check", "--netns", ns).returncode == 1

    removed = run_weir("redirect", "remove", "--netns", ns)
    assert removed.returncode == 0
    assert "removed" in removed.stdout
