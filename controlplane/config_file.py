"""The mesh config file (local mode): YAML in, a validated MeshConfig out.

Parsing is all or nothing: the first problem raises ConfigError naming the
file, the path inside the document (`workloads[2].ips[0]`) and the reason,
and nothing of that document is used. See examples/mesh.yaml for the schema.
"""

import ipaddress
import re
import reprlib
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final, TypeVar

import yaml

from controlplane.mesh import MeshConfig, NodeConfig, ServiceConfig, selects
from weir_common._generated.weir.v1 import mesh_pb2
from weir_common.errors import InvalidInputError
from weir_common.mesh import SpiffeId, resource_name

_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9.\-_]+")
_LABEL_KEY: Final = re.compile(r"([a-z0-9.\-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
MIN_TOKEN_LENGTH: Final = 16
_MTLS_MODES: Final = {"STRICT": mesh_pb2.STRICT, "PERMISSIVE": mesh_pb2.PERMISSIVE}
_ACTIONS: Final = {"ALLOW": mesh_pb2.ALLOW, "DENY": mesh_pb2.DENY}

T = TypeVar("T")
_EXCERPT: Final = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxlist, _EXCERPT.maxdict, _EXCERPT.maxstring = 2, 4, 4, 80


class ConfigError(InvalidInputError):
    """The config file is unusable; the message says where and why."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        super().__init__(f"{source}: {path or '<document>'}: {reason}")
        self.source = source
        self.path = path
        self.reason = reason


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:  # noqa: ANN401
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            # A list or mapping as a key ("? [a]"): no field is named that way.
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found unhashable key",
                key_node.start_mark,
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_bytes(data: bytes, *, source: str) -> MeshConfig:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8: {exc}") from None
    return parse(text, source=source)


def parse(text: str, *, source: str) -> MeshConfig:
    try:
        document = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(source, where, f"invalid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"invalid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(source, "", "invalid YAML: nested too deeply") from None
    return _Parser(source).mesh(document)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, reason: str) -> ConfigError:
        return ConfigError(self.source, path, reason)

    # -- generic shape checks ------------------------------------------------

    def mapping(
        self, value: object, path: str, *, required: frozenset[str], optional: frozenset[str]
    ) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str) or key not in required | optional:
                allowed = ", ".join(sorted(required | optional))
                raise self.error(_join(path, str(key)), f"unknown field (allowed: {allowed})")
        for key in sorted(required - value.keys()):
            raise self.error(_join(path, key), "required field is missing")
        return value

    def items(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"expected a list, got {_kind(value)}")
        return value

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected a non-empty string, got {_kind(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.error(path, f"{value!r} is not valid (must match {pattern.pattern})")
        return value

    def name(self, value: object, path: str) -> str:
        name = self.string(value, path, _DNS_LABEL)
        if len(name) > 63:
            raise self.error(path, f"{name!r} is longer than 63 characters")
        return name

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {_kind(value)}")
        return value

    def port(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.error(path, f"expected a port number 1-65535, got {_excerpt(value)}")
        return value

    def enum(self, value: object, path: str, choices: Mapping[str, T]) -> T:
        if not isinstance(value, str) or value not in choices:
            raise self.error(path, f"expected one of {', '.join(choices)}, got {_excerpt(value)}")
        return choices[value]

    def labels(self, value: object, path: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping of labels, got {_kind(value)}")
        labels = {}
        for key, label in value.items():
            if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
                raise self.error(_join(path, str(key)), "not a valid label key")
            if not isinstance(label, str) or not _LABEL_VALUE.fullmatch(label):
                raise self.error(
                    _join(path, key), f"label value {_excerpt(label)} is not a valid string"
                )
            labels[key] = label
        return labels

    def ip(self, value: object, path: str) -> str:
        text = self.string(value, path)
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise self.error(path, f"{text!r} is not an IP address") from None

    def cidr(self, value: object, path: str) -> str:
        text = self.string(value, path)
        try:
            return str(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise self.error(path, f"{text!r} is not a valid CIDR: {exc}") from None

    def unique(
        self, entries: object, path: str, parse: Callable[[Any, str], T], key: Callable[[T], str]
    ) -> dict[str, T]:
        result: dict[str, T] = {}
        for index, raw in enumerate(self.items(entries, path)):
            item_path = f"{path}[{index}]"
            item = parse(raw, item_path)
            if key(item) in result:
                raise self.error(item_path, f"duplicate {key(item)!r}")
            result[key(item)] = item
        return result

    # -- the document ---------------------------------------------------------

    def mesh(self, document: object) -> MeshConfig:
        top = self.mapping(
            document,
            "",
            required=frozenset({"trustDomain", "nodes"}),
            optional=frozenset({"namespaces", "workloads", "services", "authorizationPolicies"}),
        )
        trust_domain = self.string(top["trustDomain"], "trustDomain", _TRUST_DOMAIN)
        nodes = self.unique(top["nodes"], "nodes", self.node, lambda n: n.name)
        if not nodes:
            raise self.error("nodes", "at least one node is required")
        tokens: dict[str, str] = {}
        for index, node in enumerate(nodes.values()):
            if node.bootstrap_token in tokens:
                raise self.error(
                    f"nodes[{index}].bootstrapToken",
                    f"same token as node {tokens[node.bootstrap_token]!r}; each node needs its own",
                )
            tokens[node.bootstrap_token] = node.name
        namespace_modes = self.unique(
            top.get("namespaces"), "namespaces", self.namespace, lambda n: n[0]
        )
        workloads = self.unique(
            top.get("workloads"),
            "workloads",
            lambda raw, path: self.workload(raw, path, nodes, namespace_modes),
            lambda w: resource_name(w.namespace, w.name),
        )
        self.check_distinct_ips(workloads)
        services = self.unique(
            top.get("services"),
            "services",
            lambda raw, path: self.service(raw, path, workloads),
            lambda s: resource_name(s.service.namespace, s.service.name),
        )
        policies = self.unique(
            top.get("authorizationPolicies"),
            "authorizationPolicies",
            lambda raw, path: self.policy(raw, path, trust_domain, workloads),
            lambda p: resource_name(p.namespace, p.name),
        )
        return MeshConfig(trust_domain, nodes, workloads, services, policies)

    def node(self, raw: object, path: str) -> NodeConfig:
        fields = self.mapping(
            raw, path, required=frozenset({"name", "bootstrapToken"}), optional=frozenset()
        )
        name = self.string(fields["name"], _join(path, "name"), _DNS_SUBDOMAIN)
        token = fields["bootstrapToken"]
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            # Never echo the token itself.
            raise self.error(
                _join(path, "bootstrapToken"),
                f"expected a string of at least {MIN_TOKEN_LENGTH} characters",
            )
        return NodeConfig(name, token)

    def namespace(self, raw: object, path: str) -> tuple[str, "mesh_pb2.MtlsMode.ValueType"]:
        fields = self.mapping(
            raw, path, required=frozenset({"name"}), optional=frozenset({"mtlsMode"})
        )
        name = self.name(fields["name"], _join(path, "name"))
        mode = self.enum(fields.get("mtlsMode", "STRICT"), _join(path, "mtlsMode"), _MTLS_MODES)
        return name, mode

    def workload(
        self,
        raw: object,
        path: str,
        nodes: Mapping[str, NodeConfig],
        namespace_modes: Mapping[str, tuple[str, "mesh_pb2.MtlsMode.ValueType"]],
    ) -> mesh_pb2.Workload:
        fields = self.mapping(
            raw,
            path,
            required=frozenset({"name", "namespace", "serviceAccount", "node"}),
            optional=frozenset({"uid", "ips", "labels", "captured", "mtlsMode"}),
        )
        namespace = self.name(fields["namespace"], _join(path, "namespace"))
        node = self.string(fields["node"], _join(path, "node"))
        if node not in nodes:
            raise self.error(_join(path, "node"), f"node {node!r} is not declared under nodes")
        if "mtlsMode" in fields:
            mode = self.enum(fields["mtlsMode"], _join(path, "mtlsMode"), _MTLS_MODES)
        elif namespace in namespace_modes:
            mode = namespace_modes[namespace][1]
        else:
            mode = mesh_pb2.STRICT
        ips_path = _join(path, "ips")
        return mesh_pb2.Workload(
            uid=self.string(fields["uid"], _join(path, "uid")) if "uid" in fields else "",
            name=self.name(fields["name"], _join(path, "name")),
            namespace=namespace,
            service_account=self.name(fields["serviceAccount"], _join(path, "serviceAccount")),
            node=node,
            ips=[
                self.ip(ip, f"{ips_path}[{i}]")
                for i, ip in enumerate(self.items(fields.get("ips"), ips_path))
            ],
            labels=self.labels(fields.get("labels"), _join(path, "labels")),
            captured=self.boolean(fields.get("captured", True), _join(path, "captured")),
            mtls_mode=mode,
        )

    def check_distinct_ips(self, workloads: Mapping[str, mesh_pb2.Workload]) -> None:
        owner: dict[str, str] = {}
        for index, (key, workload) in enumerate(workloads.items()):
            for ip_index, ip in enumerate(workload.ips):
                if ip in owner:
                    raise self.error(
                        f"workloads[{index}].ips[{ip_index}]", f"{ip} is also used by {owner[ip]}"
                    )
                owner[ip] = key

    def service(
        self, raw: object, path: str, workloads: Mapping[str, mesh_pb2.Workload]
    ) -> ServiceConfig:
        fields = self.mapping(
            raw,
            path,
            required=frozenset({"name", "namespace", "ports"}),
            optional=frozenset({"vips", "selector"}),
        )
        namespace = self.name(fields["namespace"], _join(path, "namespace"))
        selector = self.labels(fields.get("selector"), _join(path, "selector"))
        vips_path = _join(path, "vips")
        ports = self.unique(
            fields["ports"], _join(path, "ports"), self.service_port, lambda p: str(p.port)
        )
        if not ports:
            raise self.error(_join(path, "ports"), "at least one port is required")
        endpoints = sorted(
            key
            for key, w in workloads.items()
            if selector and w.namespace == namespace and selects(selector, w.labels)
        )
        service = mesh_pb2.Service(
            name=self.name(fields["name"], _join(path, "name")),
            namespace=namespace,
            vips=[
                self.ip(vip, f"{vips_path}[{i}]")
                for i, vip in enumerate(self.items(fields.get("vips"), vips_path))
            ],
            ports=list(ports.values()),
            endpoints=endpoints,
        )
        return ServiceConfig(service, selector)

    def service_port(self, raw: object, path: str) -> mesh_pb2.ServicePort:
        fields = self.mapping(
            raw, path, required=frozenset({"port"}), optional=frozenset({"name", "targetPort"})
        )
        port = self.port(fields["port"], _join(path, "port"))
        return mesh_pb2.ServicePort(
            name=self.name(fields["name"], _join(path, "name")) if "name" in fields else "",
            port=port,
            target_port=self.port(fields.get("targetPort", port), _join(path, "targetPort")),
        )

    def policy(
        self,
        raw: object,
        path: str,
        trust_domain: str,
        workloads: Mapping[str, mesh_pb2.Workload],
    ) -> mesh_pb2.AuthorizationPolicy:
        fields = self.mapping(
            raw,
            path,
            required=frozenset({"name", "namespace", "action"}),
            optional=frozenset({"selector", "rules"}),
        )
        namespace = self.name(fields["namespace"], _join(path, "namespace"))
        selector = self.labels(fields.get("selector"), _join(path, "selector"))
        if not any(
            w.namespace == namespace and selects(selector, w.labels) for w in workloads.values()
        ):
            raise self.error(
                _join(path, "selector"),
                f"selects no workload in namespace {namespace!r} (selector {selector})",
            )
        name = self.name(fields["name"], _join(path, "name"))
        return self.policy_body(fields, path, trust_domain, name=name, namespace=namespace)

    def policy_body(
        self,
        fields: Mapping[str, Any],
        path: str,
        trust_domain: str,
        *,
        name: str,
        namespace: str,
    ) -> mesh_pb2.AuthorizationPolicy:
        rules_path = _join(path, "rules")
        return mesh_pb2.AuthorizationPolicy(
            name=name,
            namespace=namespace,
            selector=self.labels(fields.get("selector"), _join(path, "selector")),
            action=self.enum(fields["action"], _join(path, "action"), _ACTIONS),
            rules=[
                self.rule(rule, f"{rules_path}[{i}]", trust_domain)
                for i, rule in enumerate(self.items(fields.get("rules"), rules_path))
            ],
        )

    def rule(self, raw: object, path: str, trust_domain: str) -> mesh_pb2.Rule:
        fields = self.mapping(
            raw,
            path,
            required=frozenset(),
            optional=frozenset(
                {"sourcePrincipals", "sourceNamespaces", "sourceIpBlocks", "destinationPorts"}
            ),
        )
        if not fields:
            raise self.error(path, "empty rule; list at least one condition")
        principals = []
        principals_path = _join(path, "sourcePrincipals")
        raw_principals = self.items(fields.get("sourcePrincipals"), principals_path)
        for i, raw_principal in enumerate(raw_principals):
            item_path = f"{principals_path}[{i}]"
            text = self.string(raw_principal, item_path)
            spiffe = SpiffeId.parse(text)
            if spiffe is None:
                raise self.error(item_path, f"{text!r} is not spiffe://<td>/ns/<ns>/sa/<sa>")
            if spiffe.trust_domain != trust_domain:
                raise self.error(item_path, f"trust domain is not {trust_domain!r}")
            principals.append(text)
        namespaces_path = _join(path, "sourceNamespaces")
        blocks_path = _join(path, "sourceIpBlocks")
        ports_path = _join(path, "destinationPorts")
        return mesh_pb2.Rule(
            source_principals=principals,
            source_namespaces=[
                self.name(ns, f"{namespaces_path}[{i}]")
                for i, ns in enumerate(self.items(fields.get("sourceNamespaces"), namespaces_path))
            ],
            source_ip_blocks=[
                self.cidr(block, f"{blocks_path}[{i}]")
                for i, block in enumerate(self.items(fields.get("sourceIpBlocks"), blocks_path))
            ],
            destination_ports=[
                self.port(port, f"{ports_path}[{i}]")
                for i, port in enumerate(self.items(fields.get("destinationPorts"), ports_path))
            ],
        )


def parse_authorization_policy_spec(
    spec: object, *, source: str, namespace: str, name: str, trust_domain: str
) -> mesh_pb2.AuthorizationPolicy:
    """The spec of an AuthorizationPolicy custom resource (Kubernetes mode).

    The same fields and checks as an `authorizationPolicies` entry, with name
    and namespace from the object's metadata (the API server checked those);
    selecting no workload is fine, as pods come and go.
    """
    parser = _Parser(source)
    fields = parser.mapping(
        spec, "spec", required=frozenset({"action"}), optional=frozenset({"selector", "rules"})
    )
    return parser.policy_body(fields, "spec", trust_domain, name=name, namespace=namespace)


def parse_peer_authentication_spec(
    spec: object, *, source: str
) -> tuple[dict[str, str], "mesh_pb2.MtlsMode.ValueType"]:
    """(selector, mode) of a PeerAuthentication resource; an empty selector is namespace-wide."""
    parser = _Parser(source)
    fields = parser.mapping(
        spec, "spec", required=frozenset({"mode"}), optional=frozenset({"selector"})
    )
    selector = parser.labels(fields.get("selector"), "spec.selector")
    return selector, parser.enum(fields["mode"], "spec.mode", _MTLS_MODES)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _excerpt(value: object) -> str:
    """A bounded repr: YAML aliases can make a small file hold a value whose full repr is
    billions of characters long."""
    return _EXCERPT.repr(value)


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__
