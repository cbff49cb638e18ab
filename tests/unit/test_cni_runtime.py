"""libcni semantics of invoke_chain, with fake plugins that log what they were given."""

from __future__ import annotations

import json
import sys
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from node_agent.localmesh.cni_runtime import (
    CniPluginError,
    format_cni_args,
    invoke_chain,
    parse_failure,
    plugin_config,
    plugin_env,
    validate_conflist,
)
from node_agent.localmesh.conflists import node_conflist
from weir_common.errors import InvalidInputError, NodeSetupError

# Logs its command, config and env to $FAKE_LOG; fails with its config's `fail`
# code; on ADD, returns prevResult (or a fresh result) with its type appended.
FAKE_PLUGIN = f"""#!{sys.executable}
import json, os, sys
conf = json.load(sys.stdin)
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{
        "type": conf["type"],
        "command": os.environ["CNI_COMMAND"],
        "conf": conf,
        "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}},
    }}) + "\\n")
if conf.get("fail"):
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": conf["fail"],
                      "msg": conf["type"] + " says no", "details": "on purpose"}}))
    sys.exit(1)
if os.environ["CNI_COMMAND"] == "ADD":
    result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "trail": []}}
    result["trail"] = result["trail"] + [conf["type"]]
    print(json.dumps(result))
"""


@pytest.fixture
def fake_cni(tmp_path, monkeypatch):
    """A CNI path with fake plugins alpha, beta, gamma; returns (cni_path, read_log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("alpha", "beta", "gamma"):
        plugin = bin_dir / name
        plugin.write_text(FAKE_PLUGIN)
        plugin.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("CNI_COMMAND", "VERSION")  # ours must never reach a plugin

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()]

    return [tmp_path / "empty", bin_dir], calls


def conflist(*plugins: dict) -> dict:
    return {"cniVersion": "1.0.0", "name": "testnet", "plugins": list(plugins)}


def call(cni_path, **overrides):
    args = {
        "container_id": "c1",
        "netns_path": "/var/run/netns/pod",
        "ifname": "eth0",
        "cni_path": cni_path,
        "cni_args": {"K8S_POD_NAME": "web"},
    }
    return {**args, **overrides}


def test_add_runs_in_order_and_chains_prev_result(fake_cni):
    cni_path, calls = fake_cni
    chain = conflist({"type": "alpha"}, {"type": "beta"}, {"type": "gamma"})

    result = invoke_chain(chain, "ADD", **call(cni_path))

    assert result == {"cniVersion": "1.0.0", "trail": ["alpha", "beta", "gamma"]}
    log = calls()
    assert [c["type"] for c in log] == ["alpha", "beta", "gamma"]
    assert "prevResult" not in log[0]["conf"]
    assert log[1]["conf"]["prevResult"]["trail"] == ["alpha"]
    assert log[2]["conf"]["prevResult"]["trail"] == ["alpha", "beta"]
    assert {c["conf"]["name"] for c in log} == {"testnet"}
    assert log[0]["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/var/run/netns/pod",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": f"{cni_path[0]}:{cni_path[1]}",
        "CNI_ARGS": "K8S_POD_NAME=web",
    }


def test_add_stops_at_the_first_failure(fake_cni):
    cni_path, calls = fake_cni
    chain = conflist({"type": "alpha"}, {"type": "beta", "fail": 11}, {"type": "gamma"})

    with pytest.raises(CniPluginError) as err:
        invoke_chain(chain, "ADD", **call(cni_path))

    assert (err.value.plugin, err.value.code) == ("beta", 11)
    assert (err.value.msg, err.value.details) == ("beta says no", "on purpose")
    assert err.value.retryable  # 11 is "try again later"
    assert [c["type"] for c in calls()] == ["alpha", "beta"]


def test_del_runs_in_reverse_with_the_cached_result_and_past_failures(fake_cni):
    cni_path, calls = fake_cni
    chain = conflist({"type": "alpha", "fail": 7}, {"type": "beta"}, {"type": "gamma", "fail": 5})
    cached = {"cniVersion": "1.0.0", "trail": ["alpha", "beta", "gamma"]}

    with pytest.raises(CniPluginError) as err:
        invoke_chain(chain, "DEL", **call(cni_path), prev_result=cached)

    log = calls()
    assert [c["type"] for c in log] == ["gamma", "beta", "alpha"]
    assert all(c["conf"]["prevResult"] == cached for c in log)
    assert err.value.plugin == "gamma"  # the first to fail...
    assert any("alpha" in note for note in err.value.__notes__)  # ...and the other is kept


def test_del_keeps_going_when_a_plugin_is_missing(fake_cni):
    cni_path, calls = fake_cni
    chain = conflist({"type": "alpha"}, {"type": "nonexistent"}, {"type": "gamma"})

    with pytest.raises(NodeSetupError, match="nonexistent"):
        invoke_chain(chain, "DEL", **call(cni_path))

    assert [c["type"] for c in calls()] == ["gamma", "alpha"]
    assert all("prevResult" not in c["conf"] for c in calls())


def test_check_runs_in_order_with_the_cached_result(fake_cni):
    cni_path, calls = fake_cni
    chain = conflist({"type": "alpha"}, {"type": "beta"})
    cached = {"cniVersion": "1.0.0", "trail": ["alpha", "beta"]}

    with pytest.raises(InvalidInputError, match="cached ADD result"):
        invoke_chain(chain, "CHECK", **call(cni_path))
    assert invoke_chain(chain, "CHECK", **call(cni_path), prev_result=cached) is None

    assert [(c["type"], c["command"]) for c in calls()] == [("alpha", "CHECK"), ("beta", "CHECK")]
    assert all(c["conf"]["prevResult"] == cached for c in calls())


def test_add_with_garbage_output_is_a_plugin_error(fake_cni, tmp_path):
    cni_path, _ = fake_cni
    liar = cni_path[1] / "liar"
    liar.write_text("#!/bin/sh\necho not json\n")
    liar.chmod(0o755)

    with pytest.raises(CniPluginError, match="no JSON result") as err:
        invoke_chain(conflist({"type": "liar"}), "ADD", **call(cni_path))
    assert err.value.code is None


def test_plugin_config_injects_name_version_and_prev_result_without_mutating():
    chain = {
        "cniVersion": "1.0.0",
        "name": "net",
        "plugins": [{"type": "bridge", "name": "stale", "cniVersion": "0.3.1", "ipam": {}}],
    }
    original = json.loads(json.dumps(chain))

    config = plugin_config(chain, 0, {"ips": []})
    config["ipam"]["mutated"] = True

    assert config["name"] == "net"
    assert config["cniVersion"] == "1.0.0"
    assert config["prevResult"] == {"ips": []}
    assert "prevResult" not in plugin_config(chain, 0, None)
    assert chain == original


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        ({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}, "'name'"),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": []}, "non-empty 'plugins'"),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": [{"ipam": {}}]}, "no 'type'"),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../sh"}]}, "plain file"),
    ],
)
def test_malformed_conflists_are_refused(bad, complaint):
    with pytest.raises(InvalidInputError, match=complaint):
        validate_conflist(bad)


def test_cni_args_encoding():
    assert format_cni_args({"IgnoreUnknown": "1", "K8S_POD_NAME": "web"}) == (
        "IgnoreUnknown=1;K8S_POD_NAME=web"
    )
    with pytest.raises(InvalidInputError):
        format_cni_args({"K8S_POD_NAME": "a;b"})
    with pytest.raises(InvalidInputError):
        format_cni_args({"A=B": "c"})


def test_plugin_env_replaces_our_own_cni_variables(monkeypatch):
    monkeypatch.setenv("CNI_NETNS", "/proc/1/ns/net")
    monkeypatch.setenv("CNI_STALE", "x")
    env = plugin_env(
        "DEL",
        container_id="c",
        netns_path=Path("/var/run/netns/p"),
        ifname="eth0",
        cni_path=[Path("/a"), Path("/b")],
        cni_args={},
    )
    assert env["CNI_NETNS"] == "/var/run/netns/p"
    assert env["CNI_PATH"] == "/a:/b"
    assert env["CNI_ARGS"] == ""
    assert "CNI_STALE" not in env
    assert "PATH" in env


def test_parse_failure_reads_cni_errors_and_falls_back_to_stderr():
    err = parse_failure(
        "bridge", "ADD", 1, '{"cniVersion":"1.0.0","code":7,"msg":"bad range","details":"x"}', ""
    )
    assert (err.plugin, err.command, err.code, err.msg, err.details) == (
        "bridge",
        "ADD",
        7,
        "bad range",
        "x",
    )
    assert "bridge" in err.message
    assert "bad range" in err.message
    assert not err.retryable

    crash = parse_failure("bridge", "DEL", 2, "panic: oops", "goroutine 1 [running]")
    assert crash.code is None
    assert "goroutine 1" in crash.msg
    assert "status 2" in crash.msg


def test_node_conflist_ipv4_only_and_dual_stack_with_a_chained_plugin():
    tuning = {"type": "tuning", "mtu": 1280}
    v4 = node_conflist(
        network="localmesh-a",
        bridge="wlm000000br",
        pod_cidr_v4=IPv4Network("10.244.1.0/24"),
        pod_cidr_v6=None,
        ipam_data_dir=Path("/tmp/wlm000000-x/host-local/a"),
    )
    assert v4 == {
        "cniVersion": "1.0.0",
        "name": "localmesh-a",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "wlm000000br",
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "dataDir": "/tmp/wlm000000-x/host-local/a",
                    "ranges": [[{"subnet": "10.244.1.0/24"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }

    dual = node_conflist(
        network="localmesh-a",
        bridge="wlm000000br",
        pod_cidr_v4=IPv4Network("10.244.1.0/24"),
        pod_cidr_v6=IPv6Network("fd42:244:1::/64"),
        ipam_data_dir=Path("/tmp/wlm000000-x/host-local/a"),
        chained_plugins=[tuning],
    )
    ipam = dual["plugins"][0]["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd42:244:1::/64"}]]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    assert dual["plugins"][1:] == [tuning]
    dual["plugins"][1]["mtu"] = 9000
    assert tuning["mtu"] == 1280  # the conflist holds its own copy
    validate_conflist(dual)
