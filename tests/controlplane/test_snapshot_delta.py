"""Pure logic: snapshot building, per-node filtering, deltas, ACK/NACK bookkeeping."""

import random

import pytest
from cp_testing import MESH_YAML

from controlplane.config_file import parse
from controlplane.delta import Subscription
from controlplane.snapshot import EMPTY, Entry, Registration, build_snapshot, changed_names
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.mesh import POLICY_TYPE, WORKLOAD_TYPE

MESH = parse(MESH_YAML, source="test")


def _snapshot(registrations=None, previous=EMPTY):
    return build_snapshot(MESH, registrations or {}, ["ROOT"], previous=previous, now=1.0)


def test_policy_goes_only_to_nodes_hosting_selected_workloads():
    snapshot = _snapshot()
    policy = snapshot.view(POLICY_TYPE)["default/server-allow-client"]
    assert policy.audience == frozenset({"node-2"})
    assert snapshot.view(WORKLOAD_TYPE)["default/client"].visible_to("node-2")


def test_rebuild_reuses_unchanged_entries_and_diff_is_exact():
    first = _snapshot()
    second = _snapshot({"default/server": Registration("node-2", "u1", ("10.0.0.5",))}, first)
    assert (
        second.view(WORKLOAD_TYPE)["default/client"] is first.view(WORKLOAD_TYPE)["default/client"]
    )
    assert changed_names(first, second)[WORKLOAD_TYPE] == {"default/server"}
    assert changed_names(first, second)[POLICY_TYPE] == frozenset()
    # A registration from a node the pod is not declared on is ignored.
    stale = _snapshot({"default/server": Registration("node-1", "u1", ("10.0.0.5",))}, first)
    assert (
        stale.view(WORKLOAD_TYPE)["default/server"] is first.view(WORKLOAD_TYPE)["default/server"]
    )


def test_initial_update_ack_remove():
    first = _snapshot()
    sub = Subscription.open("node-1", [], {})
    delta = sub.next_push(first.view(WORKLOAD_TYPE))
    assert [e.name for e in delta.updated] == ["default/client", "default/server"]
    sub.sent("1", delta)
    assert sub.next_push(first.view(WORKLOAD_TYPE)) is None  # one in flight
    assert sub.acknowledge("1")
    second = _snapshot({"default/server": Registration("node-2", "u1", ("10.0.0.5",))}, first)
    sub.mark_dirty(changed_names(first, second)[WORKLOAD_TYPE])
    delta = sub.next_push(second.view(WORKLOAD_TYPE))
    assert [e.name for e in delta.updated] == ["default/server"] and delta.removed == ()
    sub.sent("2", delta)
    sub.acknowledge("2")
    gone = {WORKLOAD_TYPE: {}}
    sub.mark_dirty(["default/client", "default/server"])
    delta = sub.next_push(gone[WORKLOAD_TYPE])
    assert delta.updated == () and delta.removed == ("default/client", "default/server")


def test_nack_is_not_retried_until_the_resource_changes():
    first = _snapshot()
    sub = Subscription.open("node-1", [], {})
    sub.sent("1", sub.next_push(first.view(WORKLOAD_TYPE)))
    assert sub.reject("1")
    assert sub.held_versions() == {}
    sub.mark_dirty(["default/client"])
    assert sub.next_push(first.view(WORKLOAD_TYPE)) is None
    second = _snapshot({"default/client": Registration("node-1", "u", ("10.0.0.9",))}, first)
    sub.mark_dirty(changed_names(first, second)[WORKLOAD_TYPE])
    delta = sub.next_push(second.view(WORKLOAD_TYPE))
    assert [e.name for e in delta.updated] == ["default/client"]


def test_resume_sends_only_differences_and_removals():
    first = _snapshot()
    held = {name: e.version for name, e in first.view(WORKLOAD_TYPE).items()}
    held["default/vanished"] = "abc"
    sub = Subscription.open("node-1", ["*"], held)
    delta = sub.next_push(first.view(WORKLOAD_TYPE))
    assert delta.updated == () and delta.removed == ("default/vanished",)


def test_explicit_subscription_gets_only_named_resources():
    first = _snapshot()
    sub = Subscription.open("node-1", ["default/server"], {})
    delta = sub.next_push(first.view(WORKLOAD_TYPE))
    assert [e.name for e in delta.updated] == ["default/server"]


def test_in_sync_subscriptions_share_the_snapshot_view():
    first = _snapshot()
    subs = [Subscription.open(node, [], {}) for node in ("node-1", "node-2")]
    for sub in subs:
        sub.sent("1", sub.next_push(first.view(POLICY_TYPE)))
        assert sub.acknowledge("1")
        assert sub.base is first.view(POLICY_TYPE) and sub.overlay == {}
    # One shared mapping, each node reading only what is meant for it.
    assert subs[0].held_versions() == {}
    assert set(subs[1].held_versions()) == {"default/server-allow-client"}


def test_overlay_holds_only_differences_and_is_folded_back_when_in_sync():
    first = _snapshot()
    sub = Subscription.open("node-1", [], {})
    sub.sent("1", sub.next_push(first.view(WORKLOAD_TYPE)))
    sub.acknowledge("1")
    second = _snapshot({"default/server": Registration("node-2", "u1", ("10.0.0.5",))}, first)
    sub.mark_dirty(changed_names(first, second)[WORKLOAD_TYPE])
    sub.sent("2", sub.next_push(second.view(WORKLOAD_TYPE)))
    sub.acknowledge("2")
    new_version = second.view(WORKLOAD_TYPE)["default/server"].version
    assert sub.overlay == {"default/server": new_version}
    assert sub.next_push(second.view(WORKLOAD_TYPE)) is None
    assert sub.base is second.view(WORKLOAD_TYPE) and sub.overlay == {}
    assert sub.held_versions()["default/server"] == new_version


def test_rejected_version_survives_a_rebase():
    first = _snapshot()
    sub = Subscription.open("node-1", [], {})
    sub.sent("1", sub.next_push(first.view(WORKLOAD_TYPE)))
    sub.acknowledge("1")
    old = first.view(WORKLOAD_TYPE)["default/client"].version
    second = _snapshot({"default/client": Registration("node-1", "u", ("10.0.0.9",))}, first)
    sub.mark_dirty(changed_names(first, second)[WORKLOAD_TYPE])
    sub.sent("2", sub.next_push(second.view(WORKLOAD_TYPE)))
    assert sub.reject("2")
    assert sub.next_push(second.view(WORKLOAD_TYPE)) is None  # rebased
    assert sub.base is second.view(WORKLOAD_TYPE)
    assert sub.held_versions()["default/client"] == old


def test_wildcard_to_explicit_keeps_what_the_client_holds():
    first = _snapshot()
    sub = Subscription.open("node-1", [], {})
    sub.sent("1", sub.next_push(first.view(WORKLOAD_TYPE)))
    sub.acknowledge("1")
    held = sub.held_versions()
    sub.update_interest(["default/client"], ["*"])
    assert sub.base == {} and sub.held_versions() == held
    delta = sub.next_push(first.view(WORKLOAD_TYPE))
    assert delta.updated == () and delta.removed == ("default/server",)


@pytest.mark.parametrize("budget", [None, 60], ids=["whole", "split"])
def test_random_pushes_acks_and_nacks_match_a_model_client(budget):
    """Whatever the order of changes, ACKs and NACKs, held() is what the client has,
    and so it is when pushes are split to a byte budget."""
    rng = random.Random(7)
    names = [f"ns/w-{i}" for i in range(30)]
    nodes = ("node-1", "node-2")
    view: dict[str, Entry] = {}
    sub = Subscription.open("node-1", [], {})
    client: dict[str, str] = {}
    for step in range(400):
        action = rng.random()
        if action < 0.5:
            name = rng.choice(names)
            view = dict(view)  # snapshots are immutable: each change is a new view
            if name in view and rng.random() < 0.3:
                del view[name]
            else:
                audience = None if rng.random() < 0.7 else frozenset({rng.choice(nodes)})
                view[name] = _entry(name, f"v{step}", audience, size=rng.randint(5, 40))
            sub.mark_dirty([name])
        elif sub.pending is None:
            delta = sub.next_push(view, budget)
            if delta is not None:
                if budget is not None:
                    assert len(delta.updated) + len(delta.removed) == 1 or _size(delta) <= budget
                sub.sent(str(step), delta)
        else:
            delta = sub.pending.delta
            if rng.random() < 0.8:
                assert sub.acknowledge(sub.pending.nonce)
                client.update({e.name: e.version for e in delta.updated})
                for name in delta.removed:
                    client.pop(name, None)
            else:
                assert sub.reject(sub.pending.nonce)
        assert sub.held_versions() == client, step
    # Quiescent: in sync with the view except for what was rejected.
    while sub.pending is not None or (delta := sub.next_push(view, budget)) is not None:
        if sub.pending is None:
            sub.sent("last", delta)
        client.update({e.name: e.version for e in sub.pending.delta.updated})
        for name in sub.pending.delta.removed:
            client.pop(name, None)
        sub.acknowledge(sub.pending.nonce)
    expected = {n: e.version for n, e in view.items() if e.visible_to("node-1")}
    for name in set(expected) | set(client):
        if name not in sub.rejected:
            assert client.get(name) == expected.get(name), name
    assert sub.held_versions() == client
    assert set(sub.overlay) <= set(sub.rejected)


def test_a_push_over_budget_goes_in_parts_and_ends_on_the_shared_base():
    view = {f"ns/w-{i:02d}": _entry(f"ns/w-{i:02d}", "v1", None, size=30) for i in range(10)}
    sub = Subscription.open("node-1", [], {})
    parts = []
    while (delta := sub.next_push(view, 100)) is not None:
        parts.append([e.name for e in delta.updated])
        assert delta.complete_view is None  # acked name by name, not as the whole view
        assert sub.partial == (sum(map(len, parts)) < 10)
        sub.sent(str(len(parts)), delta)
        assert sub.acknowledge(str(len(parts)))
    assert parts == [[f"ns/w-{i:02d}" for i in range(j, min(j + 3, 10))] for j in range(0, 10, 3)]
    assert not sub.partial
    assert sub.base is view and sub.overlay == {}
    # One resource larger than the budget still goes, alone.
    big = {"ns/big": _entry("ns/big", "v1", None, size=500)}
    sub = Subscription.open("node-1", [], {})
    delta = sub.next_push(big, 100)
    assert [e.name for e in delta.updated] == ["ns/big"] and not sub.partial


def test_a_push_within_budget_stays_whole():
    view = {f"ns/w-{i}": _entry(f"ns/w-{i}", "v1", None, size=30) for i in range(3)}
    sub = Subscription.open("node-1", [], {})
    delta = sub.next_push(view, 90)
    assert len(delta.updated) == 3 and delta.complete_view is view and not sub.partial


def _entry(name, version, audience, size=0):
    return Entry(name, version, b"", b"x" * size, audience, mesh_pb2.Workload())


def _size(delta):
    return sum(len(e.fragment) for e in delta.updated) + sum(len(n) + 3 for n in delta.removed)
