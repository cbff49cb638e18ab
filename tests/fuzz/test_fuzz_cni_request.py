"""weir-cni's input from the runtime: the CNI_* environment and the network config on stdin.

Every input ends as a result the runtime can read: prevResult passed through,
a version answer, or a CNI error with a spec code and a message. Code 999
(weir-cni's own bug) or an exception escaping is a crash.
"""

from __future__ import annotations

import io
import json
from typing import Any
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from cni_plugin import main as plugin_main
from cni_plugin.agent_client import AgentUnreachableError
from cni_plugin.protocol import ProtocolError, Reply, Request, decode_request, encode_request
from cni_plugin.request import COMMANDS, parse_invocation, pod_ips, read_config
from cni_plugin.spec import ERR_INTERNAL, CniError
from tests.fuzz.fuzzing import (
    budget,
    file_timeout,
    inputs,
    json_seeds,
    mutated_bytes,
    mutated_json,
    seeds,
)

pytestmark = file_timeout()

CONFIGS = seeds("cni_request")
ENVS = seeds("cni_env")
_VARS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")


def _environ(raw: bytes) -> dict[str, str]:
    """An environment block as os.environ shows it (undecodable bytes as surrogates)."""
    env: dict[str, str] = {}
    for line in raw.split(b"\n"):
        key, _, value = line.partition(b"=")
        if key and b"\x00" not in line:
            env[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


ENVIRONMENTS = st.one_of(
    mutated_bytes(ENVS).map(_environ),
    st.dictionaries(
        st.sampled_from(_VARS),
        st.one_of(st.sampled_from(COMMANDS), st.text(max_size=80)),
        max_size=len(_VARS),
    ),
    st.tuples(mutated_bytes(ENVS).map(_environ), st.sampled_from(COMMANDS)).map(
        lambda pair: {**pair[0], "CNI_COMMAND": pair[1]}
    ),
)
STDIN = st.one_of(
    inputs(CONFIGS),
    mutated_json(json_seeds("cni_request")).map(lambda doc: json.dumps(doc).encode()),
)


def _refusal(error: CniError) -> None:
    assert error.msg, "a CNI error needs a message"
    assert error.code != ERR_INTERNAL
    json.loads(error.to_json("1.0.0"))


@budget(300)
@given(ENVIRONMENTS)
def test_environment_is_parsed_or_refused(environ: dict[str, str]) -> None:
    try:
        invocation = parse_invocation(environ)
    except CniError as e:
        _refusal(e)
        return
    assert invocation.command in COMMANDS


@budget(300)
@given(STDIN, st.sampled_from(COMMANDS))
def test_network_config_is_read_or_refused(raw: bytes, command: str) -> None:
    try:
        config = read_config(raw, command)
        ips = pod_ips(config.prev_result)
    except CniError as e:
        _refusal(e)
        return
    assert ips and all(isinstance(ip, str) and "/" in ip for ip in ips)


REPLIES = st.one_of(
    st.builds(Reply.success, captured=st.booleans(), reason=st.text(max_size=20)),
    st.builds(Reply.failure, st.text(min_size=1, max_size=20), retryable=st.booleans()),
    st.sampled_from((AgentUnreachableError("gone"), ProtocolError("nonsense"))),
)


@budget(250)
@given(ENVIRONMENTS, STDIN, REPLIES)
def test_whole_plugin_answers_every_input(
    environ: dict[str, str], raw: bytes, reply: Reply | Exception
) -> None:
    sent: list[Request] = []

    def fake_agent(_socket: str, request: Request, _timeout: float) -> Reply:
        # What the plugin sends must be what the agent's strict decoder takes.
        frame = encode_request(request)
        assert decode_request(frame[4:]) == request
        sent.append(request)
        if isinstance(reply, Exception):
            raise reply
        return reply

    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.object(plugin_main, "ask_agent", fake_agent):
        status = plugin_main.run(environ, io.BytesIO(raw), stdout, stderr)
    assert status in (0, 1)
    assert "Traceback" not in stderr.getvalue(), stderr.getvalue()
    out = stdout.getvalue()
    if status == 1:
        result: Any = json.loads(out)
        assert result["code"] != ERR_INTERNAL and result["msg"], result
    elif out:
        assert isinstance(json.loads(out), dict)
    assert len(sent) <= 1
