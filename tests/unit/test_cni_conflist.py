"""Inserting weir-cni into real-world shaped CNI configs, and taking it out again (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node_agent.cni_install.conflist import (
    RECORD_KEY,
    Change,
    PluginSettings,
    insert,
    primary_config,
    remove,
)
from weir_common.errors import InvalidInputError

INPUTS = Path(__file__).parent.parent / "golden" / "cni" / "input"
CASES = ["bridge", "ptp", "calico", "flannel", "cilium", "multus"]
SETTINGS = PluginSettings(agent_socket="/var/run/weir/cni.sock", agent_namespace="weir-system")


def conf_dir(case: str) -> dict[str, str]:
    """The config files of an input case (other files there are not configs)."""
    return {
        p.name: p.read_text()
        for p in sorted((INPUTS / case).iterdir())
        if p.is_file() and p.suffix in (".conf", ".conflist", ".json")
    }


def apply(files: dict[str, str], change: Change | None) -> dict[str, str]:
    assert change is not None
    out = dict(files)
    out.update(change.writes)
    for name in change.deletes:
        del out[name]
    return out


def dump(files: dict[str, str]) -> str:
    return "".join(f"=== {name}\n{files[name]}" for name in sorted(files))


def weir_entries(text: str) -> list[dict]:
    return [p for p in json.loads(text)["plugins"] if p["type"] == "weir-cni"]


@pytest.mark.parametrize("case", CASES)
def test_install_matches_golden_and_is_idempotent(case, golden):
    before = conf_dir(case)

    after = apply(before, insert(before, SETTINGS))

    golden(f"cni/{case}.installed.txt", dump(after))
    assert insert(after, SETTINGS) is None  # applied twice changes nothing


@pytest.mark.parametrize("case", CASES)
def test_uninstall_restores_every_byte(case):
    before = conf_dir(case)
    after = apply(before, insert(before, SETTINGS))

    assert apply(after, remove(after)) == before
    assert remove(before) is None


def test_primary_is_the_lowest_sorting_config_file():
    files = {
        "20-b.conflist": "{}",
        "10-a.conf.bak": "{}",  # not a config suffix: the runtime ignores it
        ".10-a.conflist.x1.weir-tmp": "{}",  # our own temp files never count
        "15-c.json": "{}",
        "15-c.conflist": "{}",
    }
    assert primary_config(files) == "15-c.conflist"
    assert primary_config({"kubeconfig": "x"}) is None


def test_single_conf_becomes_a_conflist_with_the_conf_as_its_only_plugin():
    before = conf_dir("bridge")
    change = insert(before, SETTINGS)

    assert change is not None
    assert change.deletes == ("10-containerd-net.conf",)
    doc = json.loads(dict(change.writes)["10-containerd-net.conflist"])
    assert doc["plugins"][0] == json.loads(before["10-containerd-net.conf"])
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "weir-cni"]
    assert (doc["name"], doc["cniVersion"]) == ("containerd-net", "1.0.0")


def test_only_the_primary_file_is_touched():
    before = conf_dir("cilium")
    change = insert(before, SETTINGS)

    assert change is not None
    assert [name for name, _ in change.writes] == ["05-cilium.conflist"]
    assert change.deletes == ()


def test_our_entry_moved_away_from_last_is_put_back_last(golden):
    installed = apply(conf_dir("flannel"), insert(conf_dir("flannel"), SETTINGS))
    doc = json.loads(installed["10-flannel.conflist"])
    # Someone (an operator, another chained plugin's installer) appends after us.
    doc["plugins"].append({"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}})
    drifted = {"10-flannel.conflist": json.dumps(doc)}

    repaired = apply(drifted, insert(drifted, SETTINGS))

    golden("cni/drift-appended-after-us.txt", dump(repaired))
    assert [p["type"] for p in json.loads(repaired["10-flannel.conflist"])["plugins"]] == [
        "flannel",
        "portmap",
        "tuning",
        "weir-cni",
    ]
    # Uninstall keeps the other party's edit and drops only our entry.
    restored = json.loads(apply(repaired, remove(repaired))["10-flannel.conflist"])
    assert [p["type"] for p in restored["plugins"]] == ["flannel", "portmap", "tuning"]


def test_a_double_insertion_collapses_to_one_and_still_round_trips(golden):
    before = conf_dir("calico")
    installed = apply(before, insert(before, SETTINGS))
    doc = json.loads(installed["10-calico.conflist"])
    doc["plugins"].insert(1, dict(doc["plugins"][-1]))  # a second copy, mid-chain
    doubled = {"10-calico.conflist": json.dumps(doc, indent=1)}

    repaired = apply(doubled, insert(doubled, SETTINGS))

    golden("cni/drift-double-insertion.txt", dump(repaired))
    assert len(weir_entries(repaired["10-calico.conflist"])) == 1
    assert repaired == installed  # the record of the original bytes survived
    assert apply(repaired, remove(repaired)) == before


def test_primary_rewriting_its_file_gets_our_entry_back():
    before = conf_dir("calico")
    installed = apply(before, insert(before, SETTINGS))
    # The primary CNI's installer writes its config afresh (a new MTU, without us).
    rewritten_text = before["10-calico.conflist"].replace('"mtu": 0', '"mtu": 1440')
    rewritten = {**installed, "10-calico.conflist": rewritten_text}

    repaired = apply(rewritten, insert(rewritten, SETTINGS))

    assert len(weir_entries(repaired["10-calico.conflist"])) == 1
    assert apply(repaired, remove(repaired)) == rewritten  # uninstall restores *their* new text


def test_changed_settings_update_the_entry_and_keep_the_record():
    before = conf_dir("ptp")
    installed = apply(before, insert(before, SETTINGS))
    moved = PluginSettings(agent_socket="/run/weir/other.sock", exclude_namespaces=())

    updated = apply(installed, insert(installed, moved))

    (entry,) = weir_entries(updated["20-ptp.conflist"])
    assert entry["agentSocket"] == "/run/weir/other.sock"
    assert entry["excludeNamespaces"] == []
    assert apply(updated, remove(updated)) == before


def test_a_rewritten_conf_is_converted_again_over_our_own_conflist():
    before = conf_dir("bridge")
    installed = apply(before, insert(before, SETTINGS))
    # The primary CNI writes its .conf again; it sorts before our .conflist.
    new_conf = before["10-containerd-net.conf"].replace("cni0", "cni1")
    both = {**installed, "10-containerd-net.conf": new_conf}

    assert remove(both) == Change(
        "removed 10-containerd-net.conflist (its 10-containerd-net.conf was rewritten since)",
        deletes=("10-containerd-net.conflist",),
    )
    repaired = apply(both, insert(both, SETTINGS))
    assert sorted(repaired) == ["10-containerd-net.conflist"]
    assert json.loads(repaired["10-containerd-net.conflist"])["plugins"][0]["bridge"] == "cni1"
    assert apply(repaired, remove(repaired)) == {"10-containerd-net.conf": new_conf}


def test_a_conflist_of_someone_else_blocks_converting_a_conf():
    files = {
        "10-net.conf": '{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}',
        "10-net.conflist": '{"cniVersion": "1.0.0", "name": "m", "plugins": [{"type": "ptp"}]}',
    }
    with pytest.raises(InvalidInputError, match="exists and is not weir's"):
        insert(files, SETTINGS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"cniVersion": "0.2.0", "name": "n", "type": "bridge"}', "would fail every pod"),
        ('{"cniVersion": "1.0.0", "name": "n", "plugins": [', "not valid JSON"),
        ('["not", "an", "object"]', "not a JSON object"),
        ('{"cniVersion": "1.0.0", "name": "n", "plugins": "bridge"}', "not a list of objects"),
        ('{"cniVersion": "1.0.0", "name": "n"}', "neither 'plugins' nor a plugin 'type'"),
    ],
)
def test_configs_we_cannot_extend_are_refused(text, message):
    with pytest.raises(InvalidInputError, match=message):
        insert({"10-net.conf": text}, SETTINGS)


def test_the_record_is_in_our_entry_only():
    installed = apply(conf_dir("flannel"), insert(conf_dir("flannel"), SETTINGS))
    plugins = json.loads(installed["10-flannel.conflist"])["plugins"]
    assert [RECORD_KEY in p for p in plugins] == [False, False, True]
    assert plugins[-1][RECORD_KEY]["file"] == "10-flannel.conflist"
