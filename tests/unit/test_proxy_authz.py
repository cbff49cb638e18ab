"""L4 authorization: DENY first, then no ALLOW = allow, a matching ALLOW = allow, else deny."""

from __future__ import annotations

import pytest

from node_agent.proxy.authz import Request, authorize
from node_agent.proxy.model import Action, AuthorizationPolicy, MeshSnapshot, Rule, Workload
from weir_common.mesh import SpiffeId

SERVER = Workload("u1", "server", "prod", "server", "node-1", ("10.244.1.5",), {"app": "server"})
CLIENT = SpiffeId("cluster.local", "web", "frontend")


def decide(*policies: AuthorizationPolicy, source=CLIENT, ip="10.244.2.9", port=8080):
    snapshot = MeshSnapshot("cluster.local", ("pem",), policies={p.key: p for p in policies})
    return authorize(snapshot, Request(source, ip, SERVER, port))


def policy(name, action, *rules, namespace="prod", selector=None):
    return AuthorizationPolicy(name, namespace, action, tuple(rules), selector or {})


def test_no_policy_allows():
    assert decide() == decide()
    assert decide().allowed
    assert decide().reason == "no-allow-policy"


def test_deny_wins_over_allow():
    d = decide(
        policy("allow-all", Action.ALLOW, Rule()),
        policy("deny-web", Action.DENY, Rule(source_namespaces=("web",))),
    )
    assert (d.allowed, d.reason) == (False, "deny:prod/deny-web")


def test_allow_policy_that_does_not_match_denies():
    d = decide(policy("only-admin", Action.ALLOW, Rule(source_namespaces=("admin",))))
    assert (d.allowed, d.reason) == (False, "no-allow-match")


def test_matching_allow_allows():
    d = decide(
        policy("x", Action.ALLOW, Rule(source_namespaces=("admin",))),
        policy("frontend", Action.ALLOW, Rule(source_principals=(str(CLIENT),))),
    )
    assert (d.allowed, d.reason) == (True, "allow:prod/frontend")


def test_allow_with_no_rules_allows_nothing():
    assert not decide(policy("nothing", Action.ALLOW)).allowed


def test_deny_with_no_rules_denies_nothing():
    assert decide(policy("nothing", Action.DENY)).allowed


def test_all_fields_of_a_rule_must_match():
    rule = Rule(
        source_principals=(str(CLIENT),),
        source_ip_blocks=("10.244.2.0/24",),
        destination_ports=(8080,),
    )
    assert decide(policy("p", Action.ALLOW, rule)).allowed
    assert not decide(policy("p", Action.ALLOW, rule), ip="10.244.3.1").allowed
    assert not decide(policy("p", Action.ALLOW, rule), port=9090).allowed


@pytest.mark.parametrize(
    "rule",
    [Rule(source_principals=(str(CLIENT),)), Rule(source_namespaces=("web",))],
    ids=["principal", "namespace"],
)
def test_plaintext_never_matches_identity_rules(rule):
    assert not decide(policy("p", Action.ALLOW, rule), source=None).allowed
    assert decide(policy("p", Action.DENY, rule), source=None).allowed


def test_plaintext_matches_ip_rules():
    rule = Rule(source_ip_blocks=("10.244.2.9/32",))
    assert decide(policy("p", Action.ALLOW, rule), source=None).allowed


def test_policies_select_by_namespace_and_labels():
    other_ns = policy("elsewhere", Action.DENY, Rule(), namespace="dev")
    other_app = policy("db", Action.DENY, Rule(), selector={"app": "db"})
    mine = policy(
        "server", Action.DENY, Rule(destination_ports=(9090,)), selector={"app": "server"}
    )
    assert decide(other_ns, other_app, mine).allowed
    assert not decide(other_ns, other_app, mine, port=9090).allowed


def test_a_snapshot_finds_each_workloads_policies_once_and_per_workload_object():
    mine = policy("server", Action.DENY, Rule(), selector={"app": "server"})
    snapshot = MeshSnapshot("cluster.local", ("pem",), policies={mine.key: mine})
    assert snapshot.policies_for(SERVER) == (mine,)
    assert snapshot.policies_for(SERVER) is snapshot.policies_for(SERVER)  # looked up once
    # Same name, other labels (a pod served before the snapshot knew it): its own answer.
    relabeled = Workload("u1", "server", "prod", "server", "node-1", ("10.244.1.5",), {"app": "x"})
    assert snapshot.policies_for(relabeled) == ()
    assert snapshot.policies_for(SERVER) == (mine,)
