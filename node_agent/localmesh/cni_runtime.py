"""Run a CNI network configuration list the way libcni (containerd, CRI-O) does.

ADD runs the plugins in order; each receives the previous plugin's result as
`prevResult` and the last result is the chain's. CHECK runs them in order, each
with the cached ADD result. DEL runs them in reverse with that cached result
and keeps going after a failure, so one broken plugin does not strand what the
others set up. Each plugin gets its own config from the list with the list's
`name` and `cniVersion` injected, the CNI_* environment, and config on stdin.

Nothing here knows particular plugins: bridge, host-local, tuning and Weir's
own weir-cni are all just a `type` looked up on the CNI path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, overload

from node_agent.netns import Netns, entered
from weir_common.errors import InvalidInputError, NodeSetupError, WeirError

CniCommand = Literal["ADD", "DEL", "CHECK"]

# From the CNI spec's error table: the only code that says "the same request may
# succeed later". Plugin-specific codes (100+) and 999 (generic) do not.
CNI_ERR_TRY_AGAIN_LATER: Final = 11

# A plugin that takes longer than this is hung (bridge + host-local take ~50 ms).
PLUGIN_TIMEOUT_S: Final = 30.0


class CniPluginError(WeirError):
    """A plugin failed; `code`, `msg` and `details` are its CNI error, verbatim.

    `code` is None when the plugin died without printing a CNI error (crash,
    timeout, garbage on stdout); `msg` then says what we saw instead.
    """

    def __init__(
        self, plugin: str, command: CniCommand, code: int | None, msg: str, details: str = ""
    ) -> None:
        text = f"CNI plugin {plugin} failed {command}"
        if code is not None:
            text += f" (CNI error {code})"
        text += f": {msg}"
        if details:
            text += f"; {details}"
        super().__init__(text)
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        self.retryable = code == CNI_ERR_TRY_AGAIN_LATER


def plugin_config(
    conflist: Mapping[str, Any], index: int, prev_result: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The stdin of plugin `index`: its own config plus what libcni injects."""
    config: dict[str, Any] = copy.deepcopy(dict(conflist["plugins"][index]))
    config["name"] = conflist["name"]
    config["cniVersion"] = conflist["cniVersion"]
    if prev_result is not None:
        config["prevResult"] = copy.deepcopy(dict(prev_result))
    return config


def validate_conflist(conflist: Mapping[str, Any]) -> list[str]:
    """Check the shape libcni insists on and return the plugin types, in order."""
    for key in ("name", "cniVersion"):
        if not isinstance(conflist.get(key), str) or not conflist[key]:
            raise InvalidInputError(f"conflist needs a non-empty string {key!r}")
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise InvalidInputError(f"conflist {conflist['name']!r} needs a non-empty 'plugins' list")
    types: list[str] = []
    for i, plugin in enumerate(plugins):
        ptype = plugin.get("type") if isinstance(plugin, Mapping) else None
        if not isinstance(ptype, str) or not ptype:
            raise InvalidInputError(f"plugin {i} of conflist {conflist['name']!r} has no 'type'")
        # A type is a file name on the CNI path, never a path to wander off with.
        if "/" in ptype or ptype in (".", ".."):
            raise InvalidInputError(f"plugin type {ptype!r} is not a plain file name")
        types.append(ptype)
    return types


def format_cni_args(cni_args: Mapping[str, str]) -> str:
    """CNI_ARGS as the spec writes it: `K1=V1;K2=V2`."""
    for key, value in cni_args.items():
        if not key or any(c in key for c in ";=") or ";" in value:
            raise InvalidInputError(f"CNI_ARGS entry {key!r}={value!r} cannot be encoded")
    return ";".join(f"{k}={v}" for k, v in cni_args.items())


def plugin_env(
    command: CniCommand,
    *,
    container_id: str,
    netns_path: str | Path,
    ifname: str,
    cni_path: Sequence[Path],
    cni_args: Mapping[str, str],
) -> dict[str, str]:
    """The environment of one plugin run.

    Our own environment is passed on (plugins need PATH for iptables, as under
    libcni), minus any CNI_* of ours that could leak into the request.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=container_id,
        CNI_NETNS=str(netns_path),
        CNI_IFNAME=ifname,
        CNI_PATH=os.pathsep.join(str(p) for p in cni_path),
        CNI_ARGS=format_cni_args(cni_args),
    )
    return env


def find_plugin(plugin_type: str, cni_path: Sequence[Path]) -> Path:
    """The first executable named `plugin_type` on the CNI path, as libcni's FindInPath."""
    for directory in cni_path:
        candidate = directory / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    searched = ", ".join(str(p) for p in cni_path) or "(empty CNI path)"
    raise NodeSetupError(f"CNI plugin {plugin_type!r} not found in {searched}")


def parse_failure(
    plugin: str, command: CniCommand, returncode: int, stdout: str, stderr: str
) -> CniPluginError:
    """Turn a failed run into the plugin's own CNI error, or say what it printed instead."""
    try:
        err = json.loads(stdout)
    except ValueError:
        err = None
    if isinstance(err, dict) and isinstance(err.get("code"), int) and "msg" in err:
        return CniPluginError(
            plugin, command, err["code"], str(err["msg"]), str(err.get("details", ""))
        )
    said = stderr.strip() or stdout.strip() or "no output"
    return CniPluginError(plugin, command, None, f"exited with status {returncode}: {said}")


def _exec_plugin(
    plugin_type: str,
    command: CniCommand,
    *,
    config: Mapping[str, Any],
    env: Mapping[str, str],
    cni_path: Sequence[Path],
    netns: Netns | None,
    timeout: float,
) -> str:
    binary = find_plugin(plugin_type, cni_path)
    # The child is forked by this thread, so it starts in `netns`: the plugin's
    # "host" side (bridge, host veth end, ip_forward) is then the node's netns.
    with entered(netns) if netns is not None else contextlib.nullcontext():
        try:
            proc = subprocess.run(
                [str(binary)],
                input=json.dumps(config),
                env=dict(env),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CniPluginError(
                plugin_type, command, None, f"did not finish within {timeout:g} s (killed)"
            ) from None
    if proc.returncode != 0:
        raise parse_failure(plugin_type, command, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


@overload
def invoke_chain(
    conflist: Mapping[str, Any],
    command: Literal["ADD"],
    *,
    container_id: str,
    netns_path: str | Path,
    ifname: str,
    cni_path: Sequence[Path],
    cni_args: Mapping[str, str],
    prev_result: Mapping[str, Any] | None = None,
    netns: Netns | None = None,
    timeout: float = PLUGIN_TIMEOUT_S,
) -> dict[str, Any]: ...


@overload
def invoke_chain(
    conflist: Mapping[str, Any],
    command: Literal["DEL", "CHECK"],
    *,
    container_id: str,
    netns_path: str | Path,
    ifname: str,
    cni_path: Sequence[Path],
    cni_args: Mapping[str, str],
    prev_result: Mapping[str, Any] | None = None,
    netns: Netns | None = None,
    timeout: float = PLUGIN_TIMEOUT_S,
) -> None: ...


def invoke_chain(
    conflist: Mapping[str, Any],
    command: CniCommand,
    *,
    container_id: str,
    netns_path: str | Path,
    ifname: str,
    cni_path: Sequence[Path],
    cni_args: Mapping[str, str],
    prev_result: Mapping[str, Any] | None = None,
    netns: Netns | None = None,
    timeout: float = PLUGIN_TIMEOUT_S,
) -> dict[str, Any] | None:
    """Run every plugin of `conflist` for one container, as a runtime does.

    `prev_result` is the runtime's cached ADD result: required for CHECK,
    passed to every plugin on DEL (None if the runtime has none), and for ADD
    normally None (libcni gives the first plugin no prevResult). `netns` is the
    namespace the plugins run in (the node's), `netns_path` the container's.
    ADD returns the last plugin's result; a failing plugin raises
    CniPluginError (NodeSetupError if it is not on `cni_path`). DEL runs
    every plugin even after a failure and then raises the first failure, with
    the others attached as notes.
    """
    types = validate_conflist(conflist)
    env = plugin_env(
        command,
        container_id=container_id,
        netns_path=netns_path,
        ifname=ifname,
        cni_path=cni_path,
        cni_args=cni_args,
    )

    def run(index: int, prev: Mapping[str, Any] | None) -> str:
        return _exec_plugin(
            types[index],
            command,
            config=plugin_config(conflist, index, prev),
            env=env,
            cni_path=cni_path,
            netns=netns,
            timeout=timeout,
        )

    if command == "ADD":
        result = dict(prev_result) if prev_result is not None else None
        for i, ptype in enumerate(types):
            stdout = run(i, result)
            try:
                parsed = json.loads(stdout)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise CniPluginError(ptype, command, None, f"printed no JSON result: {stdout!r}")
            result = parsed
        return result

    if command == "CHECK":
        if prev_result is None:
            raise InvalidInputError("CHECK needs the cached ADD result as prev_result")
        for i in range(len(types)):
            run(i, prev_result)
        return None

    failures: list[WeirError] = []
    for i in reversed(range(len(types))):
        try:
            run(i, prev_result)
        except WeirError as e:  # a missing binary or a vanished netns must not stop the rest
            failures.append(e)
    if failures:
        first = failures[0]
        for other in failures[1:]:
            first.add_note(f"also: {other.message}")
        raise first
    return None
