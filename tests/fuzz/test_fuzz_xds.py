"""Delta xDS pushes as the node decodes them: the agent's MeshView and the proxy's snapshot.

A push is ACKed and kept whole, or NACKed with the reason from an
InvalidInputError (counted in nacks_sent) and nothing of it kept. A NACK whose
reason says the handler *failed* means an unexpected exception: a crash.
What the proxy accepts must be usable as it stands: every address, CIDR and
port in range, so no connection later trips over config taken earlier.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from node_agent.controlplane_client import XdsClient
from node_agent.mesh_view import MeshView
from node_agent.proxy.model import MeshSnapshot
from node_agent.proxy.xds_source import SnapshotHandler
from tests.fuzz.fuzzing import budget, file_timeout, inputs, regressions, seeds
from weir_common import xds_transport
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.mesh import (
    MESSAGE_TYPES,
    POLICY_TYPE,
    RESOURCE_TYPES,
    SERVICE_TYPE,
    TRUST_BUNDLE_NAME,
    TRUST_BUNDLE_TYPE,
    WORKLOAD_TYPE,
)

pytestmark = file_timeout()

PUSHES = seeds("xds")
ROOT_PEM = next(
    m.root_certificates_pem[0]
    for raw in PUSHES
    for r in xds_transport.decode_response(raw).resources
    if r.resource.type_url == TRUST_BUNDLE_TYPE
    for m in [mesh_pb2.TrustBundle.FromString(r.resource.value)]
)
_FAILED = "config handler failed"


def _client(handler: Any) -> XdsClient:
    fake: Any = SimpleNamespace(node="node-1", endpoint=SimpleNamespace(target="fuzz"))
    return XdsClient(fake, handler)


def _feed(client: XdsClient, pushes: list[bytes]) -> None:
    """Each push through the client's apply; checks the ACK/NACK it answers with."""
    for raw in pushes:
        try:
            response = xds_transport.decode_response(raw)
        except DecodeError:
            continue  # gRPC's deserializer fails the stream; nothing reaches the client
        nacks_before = sum(client.nacks_sent.values())
        answer = xds_transport.decode_request(client._apply(response))
        assert answer.response_nonce == response.nonce
        if answer.HasField("error_detail"):
            reason = answer.error_detail.message
            assert reason and not reason.startswith(_FAILED), reason
            assert sum(client.nacks_sent.values()) == nacks_before + 1
        else:
            assert sum(client.nacks_sent.values()) == nacks_before


def _check_snapshot(snapshot: MeshSnapshot) -> None:
    snapshot.check()
    for service in snapshot.services.values():
        for port in service.ports:
            assert 0 < port.port < 65536 and 0 < port.target_port < 65536, service


# -- well-formed messages with arbitrary field values ---------------------------

_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)


# Mostly valid values: one bad field NACKs the whole push, hiding what the others would do.
def _mostly(valid: tuple[Any, ...], invalid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid), invalid
    )


_IPS = _mostly(
    ("10.244.1.17", "fd00::5", "::ffff:10.0.0.1", "10.96.0.10"),
    st.one_of(st.sampled_from(("10.0.0.256", "", "1.2.3.4/32", "fe80::1%eth0")), _TEXT),
)
_CIDRS = _mostly(
    ("10.0.0.0/8", "::/0", "10.244.1.17/32"),
    st.one_of(st.sampled_from(("10.0.0.1/8", "1.2.3.4/33")), _TEXT),
)
_U32 = _mostly((1, 80, 8080, 65535), st.one_of(st.just(0), st.integers(65536, 2**32 - 1)))
_NAMES = st.one_of(st.sampled_from(("client", "server", "")), _TEXT)

WORKLOADS = st.builds(
    mesh_pb2.Workload,
    uid=_TEXT,
    name=_NAMES,
    namespace=_NAMES,
    service_account=_NAMES,
    node=st.sampled_from(("node-1", "node-2", "")),
    ips=st.lists(_IPS, max_size=3),
    labels=st.dictionaries(_TEXT, _TEXT, max_size=2),
    captured=st.booleans(),
    mtls_mode=st.integers(-2, 5),
)
SERVICES = st.builds(
    mesh_pb2.Service,
    name=_NAMES,
    namespace=_NAMES,
    vips=st.lists(_IPS, max_size=2),
    ports=st.lists(
        st.builds(mesh_pb2.ServicePort, name=_TEXT, port=_U32, target_port=_U32), max_size=3
    ),
    endpoints=st.lists(_TEXT, max_size=3),
)
POLICIES = st.builds(
    mesh_pb2.AuthorizationPolicy,
    name=_NAMES,
    namespace=_NAMES,
    selector=st.dictionaries(_TEXT, _TEXT, max_size=2),
    action=st.integers(-1, 4),
    rules=st.lists(
        st.builds(
            mesh_pb2.Rule,
            source_principals=st.lists(_TEXT, max_size=2),
            source_namespaces=st.lists(_TEXT, max_size=2),
            source_ip_blocks=st.lists(_CIDRS, max_size=2),
            destination_ports=st.lists(_U32, max_size=2),
        ),
        max_size=2,
    ),
)
BUNDLES = st.builds(
    mesh_pb2.TrustBundle,
    trust_domain=st.one_of(st.just("cluster.local"), _TEXT),
    root_certificates_pem=st.lists(
        st.one_of(
            st.just(ROOT_PEM),
            st.just(ROOT_PEM.rstrip("\n")),
            _TEXT,
            st.just(ROOT_PEM.replace("A", "B", 1)),
        ),
        max_size=3,
    ),
)
MESSAGES = {
    WORKLOAD_TYPE: WORKLOADS,
    SERVICE_TYPE: SERVICES,
    POLICY_TYPE: POLICIES,
    TRUST_BUNDLE_TYPE: BUNDLES,
}


@st.composite
def _structured_push(draw: st.DrawFn) -> bytes:
    type_url = draw(st.sampled_from((*RESOURCE_TYPES, "type.googleapis.com/weir.v1.Nope")))
    message = MESSAGES.get(type_url, WORKLOADS).map(lambda m: m.SerializeToString())
    # Random bytes as the Any's value, now and then.
    payloads = st.one_of(message, message, message, st.binary(max_size=64))
    names = st.one_of(st.just(TRUST_BUNDLE_NAME), _NAMES)
    resources = draw(st.lists(st.tuples(names, payloads), max_size=3))
    any_type = _mostly((type_url,), st.sampled_from(RESOURCE_TYPES))
    fragments = [
        xds_transport.encode_resource_fragment(
            name, "v1", any_pb2.Any(type_url=draw(any_type), value=payload)
        )
        for name, payload in resources
    ]
    return xds_transport.encode_response(
        type_url=type_url,
        nonce=draw(_TEXT),
        system_version="v1",
        fragments=fragments,
        removed=draw(st.lists(names, max_size=2)),
    )


PUSH = st.one_of(inputs(PUSHES, max_ops=2), _structured_push())
# A session starts from the valid pushes, so later ones meet a full config to spoil.
SESSIONS = st.lists(PUSH, min_size=1, max_size=4).map(lambda tail: [*PUSHES, *tail])


@pytest.mark.parametrize("push", regressions("xds"))
def test_regression(push: bytes) -> None:
    _feed(_client(MeshView("node-1")), [*PUSHES, push])
    published: list[MeshSnapshot] = []
    _feed(_client(SnapshotHandler(published.append)), [*PUSHES, push])
    for snapshot in published:
        _check_snapshot(snapshot)


@budget(300)
@given(inputs(PUSHES))
def test_response_decodes_or_is_refused(raw: bytes) -> None:
    try:
        response = xds_transport.decode_response(raw)
    except DecodeError as e:
        assert str(e)
        return
    for resource in response.resources:
        message_type = MESSAGE_TYPES.get(resource.resource.type_url)
        if message_type is not None:
            try:
                message_type.FromString(resource.resource.value)
            except DecodeError as e:
                assert str(e)


@budget(200)
@given(SESSIONS)
def test_agent_mesh_view_acks_or_nacks_every_push(pushes: list[bytes]) -> None:
    view = MeshView("node-1")
    client = _client(view)
    _feed(client, pushes)
    for type_url in RESOURCE_TYPES:
        # What the view holds is exactly what was ACKed.
        held = view._state.get(type_url, {})
        assert held == client.resources(type_url)
    if view.synced:
        assert view.trust_bundle() is not None


@budget(250)
@given(SESSIONS)
def test_proxy_snapshot_acks_or_nacks_every_push(pushes: list[bytes]) -> None:
    published: list[MeshSnapshot] = []
    client = _client(SnapshotHandler(published.append))
    _feed(client, pushes)
    for snapshot in published:
        _check_snapshot(snapshot)
