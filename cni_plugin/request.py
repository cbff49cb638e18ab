"""Parsing what the runtime hands the plugin: CNI_* variables and the network config.

Every problem becomes a CniError with the spec's code; nothing here raises
anything else on bad input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from cni_plugin.protocol import DEFAULT_AGENT_SOCKET
from cni_plugin.spec import (
    ERR_DECODE,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    SUPPORTED_VERSIONS,
    CniError,
)

# The plugin's own keys in its conflist entry, with the defaults used when the
# entry was written by hand. The installer always writes all of them.
KEY_AGENT_SOCKET: Final = "agentSocket"
KEY_EXCLUDE_NAMESPACES: Final = "excludeNamespaces"
KEY_AGENT_NAMESPACE: Final = "agentNamespace"
KEY_AGENT_TIMEOUT: Final = "agentTimeoutSeconds"
DEFAULT_EXCLUDE_NAMESPACES: Final = ("kube-system",)
DEFAULT_AGENT_NAMESPACE: Final = "weir-system"
# How long ADD waits for the agent. The runtime retries a failed ADD, so this
# only has to cover a busy agent, not an absent one (that fails at connect).
DEFAULT_AGENT_TIMEOUT_S: Final = 10.0
MAX_AGENT_TIMEOUT_S: Final = 120.0
# A network config with a prevResult is a few KiB; refuse to buffer megabytes.
MAX_STDIN: Final = 1 << 20

COMMANDS: Final = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# Variables the spec makes mandatory per command, among the ones weir-cni uses.
# DEL insists on nothing: it must succeed whatever the runtime still knows.
_REQUIRED_ENV: Final = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
}
# Valid attachments in a GC request (spec 1.1.0).
_GC_ATTACHMENTS_KEY: Final = "cni.dev/valid-attachments"


class Invocation(NamedTuple):
    """The CNI_* environment of one run."""

    command: str
    container_id: str
    netns: str
    ifname: str
    cni_args: dict[str, str]


class PluginConfig(NamedTuple):
    """The network config on stdin, as far as weir-cni reads it."""

    cni_version: str
    prev_result: dict[str, Any] | None
    agent_socket: str
    exclude_namespaces: tuple[str, ...]
    agent_namespace: str
    agent_timeout_s: float
    valid_attachments: tuple[tuple[str, str], ...]


def parse_invocation(environ: Mapping[str, str]) -> Invocation:
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            ERR_INVALID_ENV,
            f"CNI_COMMAND is {command!r}; expected one of {', '.join(COMMANDS)}",
        )
    missing = [k for k in _REQUIRED_ENV.get(command, ()) if not environ.get(k)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"{command} needs {', '.join(missing)} in the environment")
    return Invocation(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        cni_args=parse_cni_args(environ.get("CNI_ARGS", "")),
    )


def parse_cni_args(text: str) -> dict[str, str]:
    """`K1=V1;K2=V2` as the spec writes CNI_ARGS; a pair without `=` is an error."""
    args: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS entry {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def read_config(raw: bytes, command: str) -> PluginConfig:
    if len(raw) > MAX_STDIN:
        raise CniError(ERR_DECODE, f"network config on stdin exceeds {MAX_STDIN} bytes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CniError(ERR_DECODE, "network config on stdin is not valid JSON", str(e)) from None
    if not isinstance(doc, dict):
        raise CniError(ERR_DECODE, "network config on stdin is not a JSON object")

    version = doc.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported",
            f"weir-cni supports {', '.join(SUPPORTED_VERSIONS)}",
        )

    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(ERR_INVALID_CONFIG, "prevResult is not a JSON object")

    return PluginConfig(
        cni_version=version,
        prev_result=prev,
        agent_socket=_string(doc, KEY_AGENT_SOCKET, DEFAULT_AGENT_SOCKET),
        exclude_namespaces=_strings(doc, KEY_EXCLUDE_NAMESPACES, DEFAULT_EXCLUDE_NAMESPACES),
        agent_namespace=_string(doc, KEY_AGENT_NAMESPACE, DEFAULT_AGENT_NAMESPACE),
        agent_timeout_s=_timeout(doc),
        valid_attachments=_attachments(doc) if command == "GC" else (),
    )


def pod_ips(prev_result: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The addresses the primary plugin gave the pod (`ips[].address`, CIDR notation)."""
    if prev_result is None:
        raise CniError(
            ERR_INVALID_CONFIG,
            "no prevResult: weir-cni is a chained plugin and must come after the primary "
            "network plugin in a conflist",
        )
    ips = prev_result.get("ips")
    if not isinstance(ips, list) or not ips:
        raise CniError(
            ERR_INVALID_CONFIG,
            "prevResult has no IPs: the primary network plugin gave the pod no address",
        )
    found: list[str] = []
    for entry in ips:
        address = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(address, str) or "/" not in address:
            raise CniError(ERR_INVALID_CONFIG, f"prevResult has a malformed IP entry: {entry!r}")
        found.append(address)
    return tuple(found)


def _string(doc: Mapping[str, Any], key: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(ERR_INVALID_CONFIG, f"{key} must be a non-empty string")
    return value


def _strings(doc: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = doc.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CniError(ERR_INVALID_CONFIG, f"{key} must be a list of non-empty strings")
    return tuple(value)


def _timeout(doc: Mapping[str, Any]) -> float:
    value = doc.get(KEY_AGENT_TIMEOUT, DEFAULT_AGENT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CniError(ERR_INVALID_CONFIG, f"{KEY_AGENT_TIMEOUT} must be a number")
    if not 0 < value <= MAX_AGENT_TIMEOUT_S:
        raise CniError(
            ERR_INVALID_CONFIG, f"{KEY_AGENT_TIMEOUT} must be in (0, {MAX_AGENT_TIMEOUT_S:g}]"
        )
    return float(value)


def _attachments(doc: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    # Required by the spec for GC; taking a missing list as empty would unenroll every pod.
    if _GC_ATTACHMENTS_KEY not in doc:
        raise CniError(ERR_INVALID_CONFIG, f"GC needs {_GC_ATTACHMENTS_KEY}")
    value = doc[_GC_ATTACHMENTS_KEY]
    if not isinstance(value, list):
        raise CniError(ERR_INVALID_CONFIG, f"{_GC_ATTACHMENTS_KEY} must be a list")
    found: list[tuple[str, str]] = []
    for entry in value:
        cid = entry.get("containerID") if isinstance(entry, dict) else None
        ifname = entry.get("ifname") if isinstance(entry, dict) else None
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise CniError(ERR_INVALID_CONFIG, f"GC attachment {entry!r} lacks containerID/ifname")
        found.append((cid, ifname))
    return tuple(found)
