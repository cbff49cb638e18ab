"""weir-cni: the chained CNI plugin's entry point (`cni_plugin.main:main`).

The runtime runs it after the primary network plugin. It never changes the
network: ADD prints `prevResult` back unchanged, in the version it was given,
after the node agent has answered for the pod. stdout carries only that result
or a CNI error; everything said along the way goes to stderr and, with the
request, to the agent's log.

Which pods are captured
    The plugin itself skips pods in `excludeNamespaces` (default kube-system)
    and in `agentNamespace` (the node agent's own namespace: its pods must be
    able to start while the agent is down, or a rebooted node deadlocks). Every
    other pod goes to the agent, which decides: it watches pods and alone
    sees annotations (a per-pod opt-out), which CNI_ARGS do not carry. An
    opted-out pod is answered "not captured" and starts normally.

Fail closed
    If a pod goes to the agent and the agent is down, slow or refuses, ADD
    fails (code 11 when retrying can help) and the pod does not start: no pod
    runs uncaptured by accident. DEL never fails and is safe to repeat.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import IO, Final

from cni_plugin.agent_client import AgentUnreachableError, ask_agent
from cni_plugin.protocol import PodInfo, ProtocolError, Reply, Request
from cni_plugin.request import (
    MAX_STDIN,
    Invocation,
    PluginConfig,
    parse_invocation,
    pod_ips,
    read_config,
)
from cni_plugin.spec import (
    CHECK_SINCE,
    ERR_AGENT_PROTOCOL,
    ERR_CAPTURE_MISSING,
    ERR_CAPTURE_REFUSED,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INTERNAL,
    ERR_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    LATEST_VERSION,
    SUPPORTED_VERSIONS,
    CniError,
)

# DEL and STATUS must not hold the runtime up for as long as ADD may.
_SHORT_TIMEOUT_S: Final = 5.0


class PluginLog:
    """Lines for stderr and for the agent; stdout is the runtime's and stays clean."""

    def __init__(self, stderr: IO[str]) -> None:
        self._stderr = stderr
        self._lines: list[str] = []
        self.container_id = ""

    def __call__(self, message: str) -> None:
        prefix = f"weir-cni[{self.container_id[:12]}]" if self.container_id else "weir-cni"
        self._stderr.write(f"{prefix}: {message}\n")
        self._lines.append(message)

    def lines(self) -> tuple[str, ...]:
        return tuple(self._lines)


def main() -> int:
    return run(os.environ, sys.stdin.buffer, sys.stdout, sys.stderr)


def run(environ: Mapping[str, str], stdin: IO[bytes], stdout: IO[str], stderr: IO[str]) -> int:
    """One plugin invocation; returns the exit status (0, or 1 with a CNI error on stdout)."""
    log = PluginLog(stderr)
    version = LATEST_VERSION  # of the error result, until the request tells us its own
    try:
        invocation = parse_invocation(environ)
        log.container_id = invocation.container_id
        raw = stdin.read(MAX_STDIN + 1)
        if invocation.command == "VERSION":
            stdout.write(_version(raw))
            return 0
        if invocation.command == "DEL":
            _delete(invocation, raw, log)
            return 0
        config = read_config(raw, invocation.command)
        version = config.cni_version
        output = _COMMANDS[invocation.command](invocation, config, log)
    except CniError as e:
        log(f"error {e.code}: {e.msg}" + (f" ({e.details})" if e.details else ""))
        stdout.write(e.to_json(version))
        return 1
    except Exception as e:  # a bug in weir-cni: the runtime still gets a CNI error, not a trace
        traceback.print_exc(file=stderr)
        stdout.write(CniError(ERR_INTERNAL, f"weir-cni internal error: {e!r}").to_json(version))
        return 1
    if output is not None:
        stdout.write(output)
    return 0


def _add(invocation: Invocation, config: PluginConfig, log: PluginLog) -> str:
    pod = _pod(invocation, pod_ips(config.prev_result))
    log(f"ADD {pod.describe()} netns {pod.netns} ips {','.join(pod.ips)}")
    passthrough = json.dumps(config.prev_result)
    skipped = _excluded(pod, config)
    if skipped:
        log(f"{pod.describe()} not captured: {skipped}")
        return passthrough
    reply = _ask(config, Request("add", pod, plugin_log=log.lines()), config.agent_timeout_s)
    if not reply.ok:
        code = ERR_TRY_AGAIN_LATER if reply.retryable else ERR_CAPTURE_REFUSED
        raise CniError(code, f"weir node agent could not capture {pod.describe()}: {reply.error}")
    if not reply.captured:
        log(f"{pod.describe()} not captured: {reply.reason or 'the agent said so'}")
    return passthrough


def _check(invocation: Invocation, config: PluginConfig, log: PluginLog) -> None:
    if config.cni_version not in CHECK_SINCE:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"CHECK needs cniVersion {CHECK_SINCE[0]}+")
    pod = _pod(invocation, pod_ips(config.prev_result))
    if _excluded(pod, config):
        return
    reply = _ask(config, Request("check", pod, plugin_log=log.lines()), config.agent_timeout_s)
    if not reply.ok:
        code = ERR_TRY_AGAIN_LATER if reply.retryable else ERR_CAPTURE_MISSING
        raise CniError(code, f"capture of {pod.describe()} is not in place: {reply.error}")


def _delete(invocation: Invocation, raw: bytes, log: PluginLog) -> None:
    """Tell the agent, best effort: a failing DEL would strand the pod in Terminating."""
    if not invocation.container_id:
        log("DEL without CNI_CONTAINERID: nothing to tell the agent")
        return
    try:
        config = read_config(raw, "DEL")
        ips: tuple[str, ...] = ()
        if config.prev_result is not None:
            ips = pod_ips(config.prev_result)
    except CniError as e:
        log(f"DEL with an unusable config ({e.msg}); nothing to tell the agent")
        return
    pod = _pod(invocation, ips)
    timeout = min(config.agent_timeout_s, _SHORT_TIMEOUT_S)
    try:
        reply = _ask(config, Request("del", pod, plugin_log=log.lines()), timeout)
    except CniError as e:
        log(f"DEL of {pod.describe()} not delivered ({e.msg}); the agent reconciles it later")
        return
    if not reply.ok:
        log(f"agent failed DEL of {pod.describe()}: {reply.error}")


def _status(_invocation: Invocation, config: PluginConfig, log: PluginLog) -> None:
    timeout = min(config.agent_timeout_s, _SHORT_TIMEOUT_S)
    try:
        reply = _ask(config, Request("status", plugin_log=log.lines()), timeout)
    except CniError as e:
        raise CniError(ERR_NOT_AVAILABLE, f"pods cannot be captured now: {e.msg}") from None
    if not reply.ok:
        raise CniError(ERR_NOT_AVAILABLE, f"weir node agent is not ready: {reply.error}")


def _gc(_invocation: Invocation, config: PluginConfig, log: PluginLog) -> None:
    request = Request("gc", attachments=config.valid_attachments, plugin_log=log.lines())
    reply = _ask(config, request, config.agent_timeout_s)
    if not reply.ok:
        code = ERR_TRY_AGAIN_LATER if reply.retryable else ERR_CAPTURE_REFUSED
        raise CniError(code, f"weir node agent failed GC: {reply.error}")


def _version(raw: bytes) -> str:
    """Supported versions; the requested one is echoed when we speak it."""
    try:
        requested = json.loads(raw).get("cniVersion")
    except (AttributeError, UnicodeDecodeError, ValueError, RecursionError):
        requested = None
    version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
    return json.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})


_Command = Callable[[Invocation, PluginConfig, PluginLog], str | None]
_COMMANDS: Final[dict[str, _Command]] = {
    "ADD": _add,
    "CHECK": _check,
    "STATUS": _status,
    "GC": _gc,
}


def _pod(invocation: Invocation, ips: tuple[str, ...]) -> PodInfo:
    args = invocation.cni_args
    return PodInfo(
        container_id=invocation.container_id,
        netns=invocation.netns,
        ifname=invocation.ifname,
        ips=ips,
        namespace=args.get("K8S_POD_NAMESPACE", ""),
        name=args.get("K8S_POD_NAME", ""),
        uid=args.get("K8S_POD_UID", ""),
    )


def _excluded(pod: PodInfo, config: PluginConfig) -> str:
    """Why the plugin keeps `pod` out of the mesh without asking the agent, or ""."""
    if pod.namespace and pod.namespace == config.agent_namespace:
        return f"namespace {pod.namespace} is the node agent's own"
    if pod.namespace in config.exclude_namespaces:
        return f"namespace {pod.namespace} is excluded in the plugin config"
    return ""


def _ask(config: PluginConfig, request: Request, timeout_s: float) -> Reply:
    try:
        return ask_agent(config.agent_socket, request, timeout_s)
    except AgentUnreachableError as e:
        msg = f"weir node agent unreachable at {config.agent_socket}: {e}"
        if request.op == "add" and request.pod is not None:
            msg += f"; {request.pod.describe()} is not started uncaptured, the runtime will retry"
        raise CniError(ERR_TRY_AGAIN_LATER, msg) from None
    except ProtocolError as e:
        raise CniError(ERR_AGENT_PROTOCOL, f"weir node agent answered nonsense: {e}") from None
