"""The standard delta xDS transport, typed for the parts Weir uses.

Weir speaks envoy.service.discovery.v3 AggregatedDiscoveryService
DeltaAggregatedResources with the messages from the `xds-protos` package. That
package ships no type information, so this module is the one place that
touches it: the Protocols below declare the fields Weir reads, and the
encoders return wire bytes, so the rest of the package type-checks strictly.

A response is encoded as its header (type URL, nonce, removals) followed by
one pre-encoded fragment per resource: protobuf concatenation appends to
repeated fields, so a resource is serialized once per snapshot and shared by
every node it is sent to.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, cast

from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from google.protobuf import any_pb2

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
DELTA_METHOD_NAME = "DeltaAggregatedResources"
DELTA_METHOD = f"/{ADS_SERVICE}/{DELTA_METHOD_NAME}"
# A client subscribing to this name (or to no name in its first request)
# receives every resource of the type that is meant for its node.
WILDCARD = "*"


class Status(Protocol):
    """google.rpc.Status as carried in a NACK's error_detail."""

    @property
    def code(self) -> int: ...
    @property
    def message(self) -> str: ...


class Node(Protocol):
    @property
    def id(self) -> str: ...


class DeltaRequest(Protocol):
    """envoy.service.discovery.v3.DeltaDiscoveryRequest (fields Weir reads)."""

    @property
    def node(self) -> Node: ...
    @property
    def type_url(self) -> str: ...
    @property
    def resource_names_subscribe(self) -> Sequence[str]: ...
    @property
    def resource_names_unsubscribe(self) -> Sequence[str]: ...
    @property
    def initial_resource_versions(self) -> Mapping[str, str]: ...
    @property
    def response_nonce(self) -> str: ...
    @property
    def error_detail(self) -> Status: ...
    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 (protobuf API)


class Resource(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def resource(self) -> any_pb2.Any: ...


class DeltaResponse(Protocol):
    """envoy.service.discovery.v3.DeltaDiscoveryResponse (fields Weir reads)."""

    @property
    def type_url(self) -> str: ...
    @property
    def nonce(self) -> str: ...
    @property
    def system_version_info(self) -> str: ...
    @property
    def resources(self) -> Sequence[Resource]: ...
    @property
    def removed_resources(self) -> Sequence[str]: ...


def encode_request(
    *,
    node_id: str,
    type_url: str,
    subscribe: Iterable[str] = (),
    unsubscribe: Iterable[str] = (),
    initial_versions: Mapping[str, str] | None = None,
    response_nonce: str = "",
    error: tuple[int, str] | None = None,
) -> bytes:
    """A DeltaDiscoveryRequest; `error` (gRPC code, message) makes it a NACK."""
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        initial_resource_versions=dict(initial_versions or {}),
        response_nonce=response_nonce,
    )
    request.node.id = node_id
    if error is not None:
        request.error_detail.code = error[0]
        request.error_detail.message = error[1]
    return cast(bytes, request.SerializeToString())


def decode_request(data: bytes) -> DeltaRequest:
    return cast(DeltaRequest, discovery_pb2.DeltaDiscoveryRequest.FromString(data))


def encode_resource_fragment(name: str, version: str, resource: any_pb2.Any) -> bytes:
    """One resource as a response fragment, to be appended to a response header."""
    response = discovery_pb2.DeltaDiscoveryResponse()
    entry = response.resources.add(name=name, version=version)
    entry.resource.CopyFrom(resource)
    return cast(bytes, response.SerializeToString())


def encode_response(
    *,
    type_url: str,
    nonce: str,
    system_version: str,
    fragments: Iterable[bytes],
    removed: Iterable[str],
) -> bytes:
    header = discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url,
        nonce=nonce,
        system_version_info=system_version,
        removed_resources=list(removed),
    )
    return cast(bytes, header.SerializeToString()) + b"".join(fragments)


def decode_response(data: bytes) -> DeltaResponse:
    return cast(DeltaResponse, discovery_pb2.DeltaDiscoveryResponse.FromString(data))


def passthrough(data: bytes) -> bytes:
    """gRPC (de)serializer for payloads this module already encoded."""
    return data
