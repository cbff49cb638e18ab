"""`weir node trace SRC_POD DST[:PORT]`: what would happen to that connection, and why.

Answered with the proxy's own code on this node's live config: the config
the agent holds (the same per-node xDS view the proxy gets) is turned into a
MeshSnapshot by the proxy's converters, then resolved with its routing and
decided with its authorization, as pure functions. The source's capture is
checked in the kernel when the source runs here.

Policies are decided by the destination's node, and the control plane sends
a node only the policies of the pods it hosts: for an endpoint on another
node, this node cannot know the decision, and says where to ask.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from node_agent.proxy.authz import Request, authorize
from node_agent.proxy.model import MeshSnapshot, MtlsMode, Service, Workload
from node_agent.proxy.routing import MeshRoute, resolve
from node_agent.proxy.xds_source import policy_from_proto, service_from_proto, workload_from_proto
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.errors import InvalidInputError
from weir_common.mesh import MESSAGE_TYPES, POLICY_TYPE, SERVICE_TYPE, WORKLOAD_TYPE


@dataclass(frozen=True)
class Destination:
    """DST as typed: an IP, or a service or pod by NAMESPACE/NAME; PORT if given."""

    target: str
    port: int | None


def parse_destination(text: str) -> Destination:
    host, port = text, None
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
        port = _port(port_text, text) if port_text else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, text)
    if not host:
        raise InvalidInputError(f"{text!r} is not IP[:PORT] or NAMESPACE/NAME[:PORT]")
    return Destination(host, port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidInputError(f"{whole!r}: {text!r} is not a port")
    return int(text)


def snapshot_from_dump(mesh: dict[str, dict[str, Any]]) -> MeshSnapshot:
    """The agent's `mesh` section (protobuf JSON per type) as the proxy would build it."""

    def messages(type_url: str) -> list[Any]:
        short = type_url.rsplit(".", 1)[-1]
        return [
            json_format.ParseDict(body, MESSAGE_TYPES[type_url]())
            for body in mesh.get(short, {}).values()
        ]

    bundles = [
        json_format.ParseDict(body, mesh_pb2.TrustBundle())
        for body in mesh.get("TrustBundle", {}).values()
    ]
    workloads = [workload_from_proto(m) for m in messages(WORKLOAD_TYPE)]
    services = [service_from_proto(m) for m in messages(SERVICE_TYPE)]
    policies = [policy_from_proto(m) for m in messages(POLICY_TYPE)]
    return MeshSnapshot(
        trust_domain=bundles[0].trust_domain if bundles else "",
        trust_bundle_pem=tuple(bundles[0].root_certificates_pem) if bundles else (),
        workloads={w.key: w for w in workloads},
        services={s.key: s for s in services},
        policies={p.key: p for p in policies},
    )


@dataclass(frozen=True)
class Resolved:
    address: str
    port: int
    service: Service | None
    workload: Workload | None  # dialed a pod directly


def resolve_destination(snapshot: MeshSnapshot, dst: Destination) -> Resolved:
    """The address and port the source would dial for DST."""
    service: Service | None = None
    workload: Workload | None = None
    if "/" in dst.target:
        service = snapshot.services.get(dst.target)
        workload = None if service else snapshot.workloads.get(dst.target)
        if service is None and workload is None:
            raise InvalidInputError(f"no service or pod {dst.target} in this node's config")
        address = service.vips[0] if service else (workload.ips[0] if workload else "")
    else:
        try:
            address = str(ipaddress.ip_address(dst.target))
        except ValueError:
            raise InvalidInputError(f"{dst.target!r} is not an IP or NAMESPACE/NAME") from None
        service = snapshot.service_by_vip(address)
        workload = None if service else snapshot.workload_by_ip(address)
    port = dst.port
    if port is None:
        if service is None or len(service.ports) != 1:
            raise InvalidInputError(f"{dst.target}: say which port (DST:PORT)")
        port = service.ports[0].port
    return Resolved(address, port, service, workload)


def decide(
    snapshot: MeshSnapshot,
    *,
    here: str,
    source: Workload,
    captured: bool | None,
    resolved: Resolved,
) -> dict[str, Any]:
    """Resolution and, per endpoint, the decision its proxy would make."""
    source_ip = source.ips[0] if source.ips else "0.0.0.0"  # noqa: S104 - never matched
    identity = source.identity(snapshot.trust_domain)
    route = resolve(snapshot, resolved.address, resolved.port)
    out: dict[str, Any] = {
        "dialed": f"{resolved.address}:{resolved.port}",
        "service": resolved.service.key if resolved.service else None,
    }
    if not isinstance(route, MeshRoute):
        out["route"] = "passthrough"
        out["why"] = (
            f"service {resolved.service.key} has no port {resolved.port}"
            if resolved.service
            else "not a service VIP or pod IP of the mesh: plain TCP as dialed, no policy"
        )
        out["endpoints"] = []
        return out
    out["route"] = "mesh"
    out["why"] = (
        f"service endpoints, {len(route.endpoints)} with an address of this family"
        if route.service
        else "a pod of the mesh, dialed by its IP"
    )
    endpoints = []
    for endpoint in route.endpoints:
        workload = endpoint.workload
        entry: dict[str, Any] = {
            "workload": workload.key,
            "address": f"{endpoint.address}:{endpoint.port}",
            "node": workload.node,
            "identity": str(workload.identity(snapshot.trust_domain)),
            "mtls": captured is not False and workload.captured,
        }
        if workload.node != here:
            # Policies reach only the node of the pods they select.
            entry.update(
                allowed=None,
                reason=f"decided by {workload.node}'s proxy; run this trace on {workload.node}",
            )
        elif captured is False and workload.mtls_mode is MtlsMode.STRICT:
            entry.update(allowed=False, reason="plaintext refused: mTLS mode is STRICT")
        else:
            decision = authorize(
                snapshot,
                Request(
                    None if captured is False else identity, source_ip, workload, endpoint.port
                ),
            )
            entry.update(allowed=decision.allowed, reason=decision.reason)
        endpoints.append(entry)
    out["endpoints"] = endpoints
    return out
