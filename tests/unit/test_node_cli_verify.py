"""`weir node verify`: each check's decision, from made-up inputs."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from node_agent.node_cli.verify import (
    Check,
    Process,
    backend_checks,
    bcc_check,
    cni_checks,
    count_owned,
    kernel_checks,
    listening_inodes,
    parse_status,
    uid_check,
    with_workers,
)
from node_agent.redirect.backend import Backend
from node_agent.redirect.ebpf.preflight import Finding
from node_agent.redirect.podnet import TCP_LISTEN, TcpSocket

NFT, LEGACY = Backend.NFT, Backend.LEGACY
CONF = Path("/etc/cni/net.d")
PLUGIN = Path("/opt/cni/bin/weir-cni")


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# -- kernel and bcc -----------------------------------------------------------------

FINDINGS = [
    Finding("kernel", True, "6.1"),
    Finding("cgroup v2", False, "no cgroup2 mount"),
    Finding("kernel headers for bcc", False, "headers missing"),
]


def test_ebpf_only_failures_are_problems_in_ebpf_mode_or_when_the_mode_is_unknown():
    for mode in ("ebpf", None):
        checks = by_name(kernel_checks(FINDINGS, mode))
        assert not checks["cgroup v2"].ok and not checks["kernel headers for bcc"].ok
        assert checks["kernel"].ok


def test_ebpf_only_failures_are_reported_but_no_problem_in_iptables_mode():
    checks = by_name(kernel_checks(FINDINGS, "iptables-nft"))
    assert all(c.ok for c in checks.values())
    assert checks["cgroup v2"].detail == "not needed in iptables-nft mode (no cgroup2 mount)"


def test_a_failure_outside_the_ebpf_list_stays_a_problem_in_any_mode():
    checks = kernel_checks([Finding("something else", False, "broken")], "iptables-legacy")
    assert checks == [Check("something else", False, "broken")]


def test_bcc_missing_matters_only_where_ebpf_may_run():
    assert bcc_check(True, "ebpf").ok
    assert not bcc_check(False, "ebpf").ok
    assert not bcc_check(False, None).ok
    assert bcc_check(False, "iptables-nft").ok


# -- iptables backends ----------------------------------------------------------------


def test_the_agents_backend_with_no_weir_rules_elsewhere_passes():
    checks = by_name(backend_checks("iptables-nft", {NFT: 40, LEGACY: 0}, {NFT: 3, LEGACY: 0}))
    assert checks["iptables backend"] == Check(
        "iptables backend", True, "iptables-nft (the agent's capture mode)"
    )
    assert checks["WEIR rules in one backend"].ok


def test_weir_rules_in_the_other_backend_are_the_mixup():
    checks = by_name(backend_checks("iptables-nft", {NFT: 40, LEGACY: 5}, {NFT: 3, LEGACY: 2}))
    mixup = checks["WEIR rules in one backend"]
    assert not mixup.ok
    assert "iptables-legacy holds 2 Weir rules" in mixup.detail
    legacy = by_name(backend_checks("iptables-legacy", {NFT: 1, LEGACY: 5}, {NFT: 1, LEGACY: 0}))
    assert "iptables-nft holds 1" in legacy["WEIR rules in one backend"].detail


def test_an_unusable_backend_in_use_is_a_problem():
    checks = by_name(backend_checks("iptables-legacy", {NFT: 3, LEGACY: None}, {NFT: 0}))
    assert not checks["iptables backend"].ok
    assert "iptables-legacy" in checks["iptables backend"].detail


def test_without_the_agent_the_backend_it_would_choose_is_checked():
    checks = by_name(backend_checks(None, {NFT: 0, LEGACY: 12}, {NFT: 4, LEGACY: 0}))
    assert checks["iptables backend"].detail.startswith("iptables-legacy (agent unknown")
    assert not checks["WEIR rules in one backend"].ok
    nothing = backend_checks(None, {NFT: None, LEGACY: None}, {NFT: None, LEGACY: None})
    assert len(nothing) == 1 and not nothing[0].ok


def test_in_ebpf_mode_only_weir_rules_in_both_backends_are_a_problem():
    assert all(c.ok for c in backend_checks("ebpf", {NFT: 1, LEGACY: 1}, {NFT: 2, LEGACY: 0}))
    both = by_name(backend_checks("ebpf", {NFT: 1, LEGACY: 1}, {NFT: 2, LEGACY: 1}))
    assert not both["WEIR rules in one backend"].ok


def test_weir_rules_are_counted_as_chains_plus_the_jumps_into_them():
    save = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:WEIR-OUTBOUND - [0:0]\n"
        ":KUBE-X - [0:0]\n-A OUTPUT -p tcp -j WEIR-OUTBOUND\n-A OUTPUT -j KUBE-X\n"
        "-A WEIR-OUTBOUND -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
    )
    assert count_owned(save) == 2
    assert count_owned("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n") == 0


# -- CNI chain -----------------------------------------------------------------------


def conflist(*types: str) -> str:
    plugins = ", ".join(f'{{"type": "{t}"}}' for t in types)
    return f'{{"cniVersion": "1.0.0", "name": "net", "plugins": [{plugins}]}}'


def test_weir_cni_last_in_the_primary_config_with_its_binary_passes():
    checks = by_name(
        cni_checks(CONF, {"10-bridge.conflist": conflist("bridge", "weir-cni")}, PLUGIN, True)
    )
    assert all(c.ok for c in checks.values())
    assert checks["CNI config"].detail == f"{CONF}/10-bridge.conflist: bridge -> weir-cni"


def test_only_the_lowest_sorting_config_counts_as_the_runtime_uses_only_it():
    files = {"05-other.conflist": conflist("bridge"), "10-ok.conflist": conflist("weir-cni")}
    checks = by_name(cni_checks(CONF, files, PLUGIN, True))
    assert checks["weir-cni in chain"] == Check(
        "weir-cni in chain", False, f"weir-cni is not in {CONF}/05-other.conflist"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (conflist("weir-cni", "portmap"), "weir-cni is not last in"),
        (conflist("bridge", "weir-cni", "weir-cni"), "2 times"),
        (conflist("bridge"), "weir-cni is not in"),
    ],
)
def test_weir_cni_missing_twice_or_not_last_is_a_problem(text, expected):
    chain = by_name(cni_checks(CONF, {"10.conflist": text}, PLUGIN, True))["weir-cni in chain"]
    assert not chain.ok
    assert expected in chain.detail


def test_a_config_that_does_not_parse_is_a_problem_and_says_why():
    for text, why in [("{", "not valid JSON"), ("[]", "not a JSON object"),
                      ('{"plugins": 3}', "'plugins' is not a list")]:  # fmt: skip
        (config, _binary) = cni_checks(CONF, {"10.conflist": text}, PLUGIN, True)
        assert not config.ok and why in config.detail


def test_a_single_plugin_conf_is_read_as_libcni_runs_it():
    checks = by_name(cni_checks(CONF, {"10.conf": '{"type": "bridge"}'}, PLUGIN, True))
    assert checks["CNI config"].ok
    assert not checks["weir-cni in chain"].ok


def test_no_conf_dir_no_config_and_no_binary_are_problems():
    assert [c.ok for c in cni_checks(CONF, None, PLUGIN, False)] == [False, False]
    (config, binary) = cni_checks(CONF, {}, PLUGIN, False)
    assert config.detail == f"{CONF} holds no network config"
    assert binary.detail == f"{PLUGIN} is missing or not executable"


# -- UID 1337 ------------------------------------------------------------------------


def test_only_the_proxy_may_run_as_uid_1337():
    proxy = Process(100, "weir", 1337, 1337)
    root = Process(1, "init", 0, 0)
    assert uid_check([root, proxy], {100}) == Check("UID 1337", True, "the proxy (pid 100) only")
    assert uid_check([root], set()) == Check("UID 1337", True, "no process runs as it")


def test_a_process_with_uid_1337_real_or_effective_is_reported_by_pid():
    setuid = Process(200, "sneaky", 1000, 1337)
    real = Process(300, "app", 1337, 0, here=False)
    check = uid_check([Process(100, "weir", 1337, 1337), setuid, real], {100})
    assert not check.ok
    assert check.detail.endswith("200 (sneaky), 300 (app, another netns)")
    assert "no proxy found" in uid_check([real], set()).detail


def test_the_proxys_other_workers_are_the_proxy_too():
    leader = Process(100, "weir", 1337, 1337)
    worker = Process(101, "weir", 1337, 1337, parent=100)
    stray = Process(102, "app", 1337, 1337, parent=1)
    root_child = Process(103, "sh", 0, 0, parent=100)
    pids = with_workers({100}, [leader, worker, stray, root_child])
    assert pids == {100, 101}
    check = uid_check([leader, worker, stray], pids)
    assert not check.ok and check.detail.endswith("102 (app)")
    assert uid_check([leader, worker], pids).detail == "the proxy (pid 100, 101) only"


def test_the_proxy_is_the_holder_of_its_loopback_admin_listener():
    loopback, anywhere = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("0.0.0.0")
    peer = (ipaddress.ip_address("127.0.0.1"), 40000)
    sockets = [
        TcpSocket(4, (loopback, 15019), (anywhere, 0), TCP_LISTEN, 11),
        TcpSocket(6, (ipaddress.ip_address("::1"), 15019), (anywhere, 0), TCP_LISTEN, 12),
        TcpSocket(4, (loopback, 15019), peer, 0x01, 13),  # an accepted connection
        TcpSocket(4, (anywhere, 15019), (anywhere, 0), TCP_LISTEN, 14),  # not loopback
        TcpSocket(4, (loopback, 15000), (anywhere, 0), TCP_LISTEN, 15),
    ]
    assert listening_inodes(sockets, 15019) == {11, 12}


def test_proc_status_is_parsed_for_name_and_uids():
    text = "Name:\tweir\nUmask:\t0022\nPPid:\t7\nUid:\t1337\t1338\t1337\t1337\nGid:\t0\t0\t0\t0\n"
    assert parse_status(42, text) == Process(42, "weir", 1337, 1338, parent=7)
    assert parse_status(42, "Name:\tx\n") is None
