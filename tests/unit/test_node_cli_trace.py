"""`weir node trace`'s pure parts: parsing DST, resolving it, deciding per endpoint."""

from __future__ import annotations

import dataclasses

import pytest

from node_agent.node_cli.trace import (
    Destination,
    decide,
    parse_destination,
    resolve_destination,
)
from node_agent.proxy.model import (
    Action,
    AuthorizationPolicy,
    MeshSnapshot,
    MtlsMode,
    Rule,
    Service,
    ServicePort,
    Workload,
)
from weir_common.errors import InvalidInputError

CLIENT = Workload("u1", "client", "default", "client", "node-1", ("10.0.1.2",))
DB = Workload("u2", "db", "default", "db", "node-2", ("10.0.2.3",), labels={"app": "db"})
SNAPSHOT = MeshSnapshot(
    trust_domain="cluster.local",
    trust_bundle_pem=(),
    workloads={w.key: w for w in (CLIENT, DB)},
    services={
        "default/db": Service(
            "db", "default", ("10.96.0.11",), (ServicePort(5432, 5432, "tcp"),), ("default/db",)
        )
    },
    policies={
        "default/db-allow": AuthorizationPolicy(
            "db-allow",
            "default",
            Action.ALLOW,
            (Rule(source_principals=("spiffe://cluster.local/ns/default/sa/client",)),),
            selector={"app": "db"},
        )
    },
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("default/db", Destination("default/db", None)),
        ("default/db:5432", Destination("default/db", 5432)),
        ("10.96.0.11:5432", Destination("10.96.0.11", 5432)),
        ("[fd00::1]:80", Destination("fd00::1", 80)),
        ("fd00::1", Destination("fd00::1", None)),
    ],
)
def test_destinations_parse(text, want):
    assert parse_destination(text) == want


@pytest.mark.parametrize("text", ["default/db:x", "10.0.0.1:0", ":80", "[fd00::1]:99999"])
def test_bad_destinations_are_refused(text):
    with pytest.raises(InvalidInputError):
        parse_destination(text)


def test_a_service_by_name_resolves_to_its_vip_and_only_port():
    resolved = resolve_destination(SNAPSHOT, Destination("default/db", None))
    assert (resolved.address, resolved.port, resolved.service.key) == (
        "10.96.0.11",
        5432,
        "default/db",
    )
    with pytest.raises(InvalidInputError, match="no service or pod"):
        resolve_destination(SNAPSHOT, Destination("default/nope", 1))
    with pytest.raises(InvalidInputError, match="say which port"):
        resolve_destination(SNAPSHOT, Destination("10.0.2.3", None))


def test_the_decision_is_made_only_on_the_destinations_node():
    resolved = resolve_destination(SNAPSHOT, Destination("default/db", None))
    there = decide(SNAPSHOT, here="node-2", source=CLIENT, captured=None, resolved=resolved)
    [endpoint] = there["endpoints"]
    assert (endpoint["allowed"], endpoint["reason"], endpoint["mtls"]) == (
        True,
        "allow:default/db-allow",
        True,
    )
    elsewhere = decide(SNAPSHOT, here="node-1", source=CLIENT, captured=True, resolved=resolved)
    assert elsewhere["endpoints"][0]["allowed"] is None


def test_an_uncaptured_source_arrives_in_plaintext():
    resolved = resolve_destination(SNAPSHOT, Destination("default/db", None))
    strict = decide(SNAPSHOT, here="node-2", source=CLIENT, captured=False, resolved=resolved)
    assert strict["endpoints"][0]["reason"] == "plaintext refused: mTLS mode is STRICT"
    permissive_db = dataclasses.replace(DB, mtls_mode=MtlsMode.PERMISSIVE)
    snapshot = dataclasses.replace(SNAPSHOT, workloads={CLIENT.key: CLIENT, DB.key: permissive_db})
    plain = decide(snapshot, here="node-2", source=CLIENT, captured=False, resolved=resolved)
    # No identity in plaintext: the principal rule cannot match.
    assert plain["endpoints"][0]["reason"] == "no-allow-match"
