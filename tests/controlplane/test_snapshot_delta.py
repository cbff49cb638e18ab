"""Pure logic: snapshot building, per-node filtering, deltas, ACK/NACK bookkeeping."""

from cp_testing import MESH_YAML

from controlplane.config_file import parse
from controlplane.delta import Subscription
from controlplane.mesh import POLICY_TYPE, WORKLOAD_TYPE
from controlplane.snapshot import EMPTY, Registration, build_snapshot, changed_names

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
    sub = Subscription.open([], {})
    delta = sub.next_push(first.view(WORKLOAD_TYPE), "node-1")
    assert [e.name for e in delta.updated] == ["default/client", "default/server"]
    sub.sent("1", delta)
    assert sub.next_push(first.view(WORKLOAD_TYPE), "node-1") is None  # one in flight
    assert sub.acknowledge("1")
    second = _snapshot({"default/server": Registration("node-2", "u1", ("10.0.0.5",))}, first)
    sub.mark_dirty(changed_names(first, second)[WORKLOAD_TYPE])
    delta = sub.next_push(second.view(WORKLOAD_TYPE), "node-1")
    assert [e.name for e in delta.updated] == ["default/server"] and delta.removed == ()
    sub.sent("2", delta)
    sub.acknowledge("2")
    gone = {WORKLOAD_TYPE: {}}
    sub.mark_dirty(["default/client", "default/server"])
    delta = sub.next_push(gone[WORKLOAD_TYPE], "node-1")
    assert delta.updated == () and delta.removed == ("default/client", "default/server")


def test_nack_is_not_retried_until_the_resource_changes():
    first = _snapshot()
    sub = Subscription.open([], {})
    sub.sent("1", sub.next_push(first.view(WORKLOAD_TYPE), "node-1"))
    assert sub.reject("1")
    assert sub.known == {}
    sub.mark_dirty(["default/client"])
    assert sub.next_push(first.view(WORKLOAD_TYPE), "node-1") is None
    second = _snapshot({"default/client": Registration("node-1", "u", ("10.0.0.9",))}, first)
    sub.mark_dirty(changed_names(first, second)[WORKLOAD_TYPE])
    delta = sub.next_push(second.view(WORKLOAD_TYPE), "node-1")
    assert [e.name for e in delta.updated] == ["default/client"]


def test_resume_sends_only_differences_and_removals():
    first = _snapshot()
    held = {name: e.version for name, e in first.view(WORKLOAD_TYPE).items()}
    held["default/vanished"] = "abc"
    sub = Subscription.open(["*"], held)
    delta = sub.next_push(first.view(WORKLOAD_TYPE), "node-1")
    assert delta.updated == () and delta.removed == ("default/vanished",)


def test_explicit_subscription_gets_only_named_resources():
    first = _snapshot()
    sub = Subscription.open(["default/server"], {})
    delta = sub.next_push(first.view(WORKLOAD_TYPE), "node-1")
    assert [e.name for e in delta.updated] == ["default/server"]
