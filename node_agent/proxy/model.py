"""The proxy's view of the mesh: one immutable, plain-data snapshot.

Field names follow weir_common/protos/weir/v1/mesh.proto (Workload, Service,
AuthorizationPolicy, TrustBundle), so the xDS client can fill a snapshot
field by field. The proxy swaps the whole snapshot on every change; a
connection uses the snapshot that was current when it arrived.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from weir_common.mesh import SpiffeId, resource_name

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class MtlsMode(enum.Enum):
    STRICT = "STRICT"  # inbound plaintext refused; only HBONE accepted
    PERMISSIVE = "PERMISSIVE"  # inbound plaintext accepted alongside HBONE


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True)
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Whether this pod's traffic goes through a node proxy; only captured
    # pods have a 15008 listener, so only they can be reached over HBONE.
    captured: bool = True
    mtls_mode: MtlsMode = MtlsMode.STRICT

    # Cached (workloads are immutable and live as long as the snapshot): the
    # proxy asks these on every connection.
    @cached_property
    def key(self) -> str:
        return resource_name(self.namespace, self.name)

    def identity(self, trust_domain: str) -> SpiffeId:
        return _spiffe_id(trust_domain, self.namespace, self.service_account)

    def ip_of_family(self, version: int) -> str | None:
        return self._first_ip_by_version.get(version)

    @cached_property
    def _first_ip_by_version(self) -> dict[int, str]:
        first: dict[int, str] = {}
        for ip in self.ips:
            first.setdefault(ipaddress.ip_address(ip).version, ip)
        return first


@dataclass(frozen=True)
class ServicePort:
    port: int  # on the VIPs
    target_port: int  # on the endpoints
    name: str = ""


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    vips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    # Workload keys ("<namespace>/<name>"), as the control plane resolved the selector.
    endpoints: tuple[str, ...]

    @property
    def key(self) -> str:
        return resource_name(self.namespace, self.name)

    def target_port(self, port: int) -> int | None:
        return next((p.target_port for p in self.ports if p.port == port), None)


@dataclass(frozen=True)
class Rule:
    """All non-empty fields must match; an empty field matches anything."""

    source_principals: tuple[str, ...] = ()
    source_namespaces: tuple[str, ...] = ()
    source_ip_blocks: tuple[str, ...] = ()
    destination_ports: tuple[int, ...] = ()

    @cached_property
    def source_networks(self) -> tuple[IpNetwork, ...]:
        return tuple(ipaddress.ip_network(block, strict=False) for block in self.source_ip_blocks)


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: Action
    # A connection matches the policy if it matches any rule; none matches nothing.
    rules: tuple[Rule, ...]
    # Empty selects every workload of `namespace`.
    selector: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        return resource_name(self.namespace, self.name)

    def selects(self, workload: Workload) -> bool:
        return workload.namespace == self.namespace and all(
            workload.labels.get(k) == v for k, v in self.selector.items()
        )


@dataclass(frozen=True)
class MeshSnapshot:
    trust_domain: str
    trust_bundle_pem: tuple[str, ...]
    workloads: Mapping[str, Workload] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)
    policies: Mapping[str, AuthorizationPolicy] = field(default_factory=dict)

    @cached_property
    def _workloads_by_ip(self) -> dict[str, Workload]:
        return {_canonical(ip): w for w in self.workloads.values() for ip in w.ips}

    @cached_property
    def _services_by_vip(self) -> dict[str, Service]:
        return {_canonical(vip): s for s in self.services.values() for vip in s.vips}

    def check(self) -> None:
        """Parse every address and CIDR and check every port now (ValueError if one is bad),
        so bad config is refused when it arrives rather than when a connection needs it."""
        _ = self._workloads_by_ip, self._services_by_vip
        for policy in self.policies.values():
            for rule in policy.rules:
                _ = rule.source_networks
        for key, service in self.services.items():
            # uint32 on the wire: a port out of range would fail only when dialed.
            for p in service.ports:
                if not (0 < p.port < 65536 and 0 < p.target_port < 65536):
                    raise ValueError(
                        f"service {key} maps port {p.port} to {p.target_port}: not in 1-65535"
                    )

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._workloads_by_ip.get(_canonical(ip))

    def service_by_vip(self, ip: str) -> Service | None:
        return self._services_by_vip.get(_canonical(ip))

    def policies_for(self, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        # Asked for every inbound connection: looked through once per workload.
        # Keyed by id() (a Workload hashes all its fields, in Python), the
        # workload kept alongside so its id cannot be reused while cached.
        if not self.policies:
            return ()
        found = self._policies_by_workload.get(id(workload))
        if found is None or found[0] is not workload:
            found = (workload, tuple(p for p in self.policies.values() if p.selects(workload)))
            self._policies_by_workload[id(workload)] = found
        return found[1]

    @cached_property
    def _policies_by_workload(
        self,
    ) -> dict[int, tuple[Workload, tuple[AuthorizationPolicy, ...]]]:
        return {}

    def dump(self) -> dict[str, Any]:
        """Plain data for the admin config_dump."""
        return {
            "trust_domain": self.trust_domain,
            "trust_bundle_roots": len(self.trust_bundle_pem),
            "workloads": {k: _plain(w) for k, w in sorted(self.workloads.items())},
            "services": {k: _plain(s) for k, s in sorted(self.services.items())},
            "policies": {k: _plain(p) for k, p in sorted(self.policies.items())},
        }


@lru_cache(maxsize=4096)
def _spiffe_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """One object per identity, so its URI is built once (SpiffeId.uri is cached)."""
    return SpiffeId(trust_domain, namespace, service_account)


# Cached: every connection looks up its peer's and its destination's address
# (and a CONNECT names one), and parsing took a few percent of the proxy's
# time per new connection.
@lru_cache(maxsize=4096)
def parse_ip(text: str) -> tuple[str, int] | None:
    """(canonical text, version) of an IP address, or None if `text` is not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(address), address.version


def _canonical(ip: str) -> str:
    parsed = parse_ip(ip)
    if parsed is None:
        raise ValueError(f"{ip!r} is not an IP address")
    return parsed[0]


def _plain(value: Workload | Service | AuthorizationPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in value.__dataclass_fields__:
        item = getattr(value, name)
        if isinstance(item, enum.Enum):
            out[name] = item.value
        elif isinstance(item, Mapping):
            out[name] = dict(item)
        elif isinstance(item, tuple):
            out[name] = [
                {f: getattr(x, f) for f in x.__dataclass_fields__}
                if hasattr(x, "__dataclass_fields__")
                else x
                for x in item
            ]
        else:
            out[name] = item
    return out
