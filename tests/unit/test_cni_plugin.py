"""weir-cni against a test agent, through both of its entry points.

Every test runs `python -m cni_plugin` and the built bundle's `weir-cni` (the C
front end, which hands what it does not handle to the frozen Python plugin):
both must behave the same.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from node_agent.cni_events.server import CniEventServer
from testbed.cni_fakes import RecordingHandler
from weir_common.errors import InvalidInputError, TransientError

REPO = Path(__file__).resolve().parents[2]
PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/p"}],
    "ips": [
        {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0},
        {"address": "fd00:10:244:1::5/64", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


@pytest.fixture
def agent():
    """A CNI event server with a RecordingHandler on a short socket path; yields (handler, path)."""
    work = Path(tempfile.mkdtemp(prefix="weircni-"))
    handler = RecordingHandler()
    server = CniEventServer(work / "cni.sock", handler)
    try:
        with server:
            yield handler, str(work / "cni.sock")
    finally:
        shutil.rmtree(work)


@pytest.fixture
def netns_file(tmp_path):
    """Stands in for a pod netns: the test handler only stats it."""
    path = tmp_path / "netns"
    path.touch()
    return str(path)


def config(socket_path: str, version: str = "1.0.0", **extra) -> dict:
    conf = {
        "cniVersion": version,
        "name": "testnet",
        "type": "weir-cni",
        "agentSocket": socket_path,
        "agentTimeoutSeconds": 2,
        "prevResult": {**PREV_RESULT, "cniVersion": version},
    }
    conf.update(extra)
    return {k: v for k, v in conf.items() if v is not None}


@pytest.fixture(scope="module")
def bundle() -> Path:
    """The built weir-cni bundle (rebuilt only when its sources changed)."""
    subprocess.run(["scripts/build-cni-plugin.sh"], cwd=REPO, check=True, timeout=300)
    return REPO / "build" / "cni-plugin" / "weir-cni"


@pytest.fixture(params=["python", "bundle"])
def run_plugin(request):
    """run(command, stdin, ...) with one of the plugin's two entry points."""
    if request.param == "python":
        argv = [sys.executable, "-m", "cni_plugin"]
    else:
        argv = [str(request.getfixturevalue("bundle") / "weir-cni")]
    return functools.partial(run, argv)


def run(argv, command, stdin, *, netns="/var/run/netns/p", pod=("default", "web"), **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")} | {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};"
        "K8S_POD_UID=1234-5678",
    }
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    return subprocess.run(
        argv,
        input=data,
        capture_output=True,
        cwd=REPO,
        env=full_env,
        timeout=30,
        check=False,
    )


def cni_error(proc) -> dict:
    assert proc.returncode == 1, proc
    assert b"Traceback" not in proc.stdout
    err = json.loads(proc.stdout)
    assert set(err) <= {"cniVersion", "code", "msg", "details"}
    return err


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0", "0.4.0"])
def test_add_hands_the_pod_to_the_agent_and_returns_prev_result_unchanged(
    run_plugin, agent, netns_file, version
):
    handler, sock = agent
    conf = config(sock, version)

    proc = run_plugin("ADD", conf, netns=netns_file)

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == conf["prevResult"]
    (event,) = handler.events("add")
    assert event.pod == (
        "c0ffee",
        netns_file,
        "eth0",
        ("10.244.1.5/24", "fd00:10:244:1::5/64"),
        "default",
        "web",
        "1234-5678",
    )
    assert handler.captured() == {"c0ffee"}


def test_add_of_an_excluded_namespace_never_asks_the_agent(run_plugin, agent, netns_file):
    handler, sock = agent
    for pod in (("kube-system", "coredns"), ("weir-system", "weir-node-x1")):
        proc = run_plugin("ADD", config(sock), netns=netns_file, pod=pod)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == PREV_RESULT
        assert f"{pod[0]}/{pod[1]} not captured" in proc.stderr.decode()
    assert handler.events() == []


def test_an_opted_out_pod_starts_uncaptured(run_plugin, agent, netns_file):
    handler, sock = agent
    handler.opt_out.add(("default", "web"))

    proc = run_plugin("ADD", config(sock), netns=netns_file)

    assert proc.returncode == 0
    assert json.loads(proc.stdout) == PREV_RESULT
    assert "opted out by annotation" in proc.stderr.decode()
    assert handler.captured() == set()


def test_plugin_log_lines_reach_the_agent(run_plugin, agent, netns_file, caplog):
    _, sock = agent
    with caplog.at_level("INFO", logger="weir.cni_plugin"):
        proc = run_plugin("ADD", config(sock), netns=netns_file)
    assert proc.returncode == 0
    line = f"ADD default/web netns {netns_file} ips 10.244.1.5/24,fd00:10:244:1::5/64"
    assert line in proc.stderr.decode()
    assert [r.getMessage() for r in caplog.records if r.name == "weir.cni_plugin"] == [
        f"default/web: {line}"
    ]


def test_an_agent_refusing_a_missing_netns_is_a_permanent_error(run_plugin, agent):
    _, sock = agent
    err = cni_error(run_plugin("ADD", config(sock), netns="/nonexistent/netns"))
    assert err["code"] == 100
    assert "netns of default/web" in err["msg"]


def test_add_fails_closed_when_the_agent_is_down(run_plugin, netns_file, tmp_path):
    proc = run_plugin("ADD", config(str(tmp_path / "absent.sock")), netns=netns_file)

    err = cni_error(proc)
    assert err["code"] == 11
    assert "unreachable" in err["msg"]
    assert "default/web is not started uncaptured" in err["msg"]
    assert err["msg"] in proc.stderr.decode()


@pytest.mark.parametrize(
    ("refusal", "code"),
    [(TransientError("proxy not ready"), 11), (InvalidInputError("pod has hostNetwork"), 100)],
)
def test_add_fails_closed_when_the_agent_refuses(run_plugin, agent, netns_file, refusal, code):
    handler, sock = agent
    handler.refuse = refusal

    err = cni_error(run_plugin("ADD", config(sock), netns=netns_file))

    assert err["code"] == code
    assert err["msg"] == f"weir node agent could not capture default/web: {refusal.message}"


def test_add_gives_up_at_its_deadline_when_the_agent_hangs(run_plugin, tmp_path, netns_file):
    work = Path(tempfile.mkdtemp(prefix="weircni-"))
    sock_path = work / "hang.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen(1)
    try:
        proc = run_plugin("ADD", config(str(sock_path), agentTimeoutSeconds=0.5), netns=netns_file)
    finally:
        listener.close()
        shutil.rmtree(work)
    err = cni_error(proc)
    assert err["code"] == 11
    assert "no answer within 0.5 s" in err["msg"]


def test_del_is_delivered_and_always_succeeds(run_plugin, agent, netns_file, tmp_path):
    handler, sock = agent
    assert run_plugin("ADD", config(sock), netns=netns_file).returncode == 0

    first = run_plugin("DEL", config(sock, prevResult=None), netns="")
    again = run_plugin("DEL", config(sock))
    agent_down = run_plugin("DEL", config(str(tmp_path / "absent.sock")))
    garbage = run_plugin("DEL", b"{not json")

    for proc in (first, again, agent_down, garbage):
        assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr
    assert [e.pod.ips for e in handler.events("del")] == [
        (),
        ("10.244.1.5/24", "fd00:10:244:1::5/64"),
    ]
    assert handler.captured() == set()
    assert "not delivered" in agent_down.stderr.decode()


def test_check_passes_while_captured_and_fails_once_capture_is_lost(run_plugin, agent, netns_file):
    handler, sock = agent
    assert run_plugin("ADD", config(sock), netns=netns_file).returncode == 0

    ok = run_plugin("CHECK", config(sock), netns=netns_file)
    assert (ok.returncode, ok.stdout) == (0, b"")

    handler.lose_capture("c0ffee")
    err = cni_error(run_plugin("CHECK", config(sock), netns=netns_file))
    assert err["code"] == 11
    assert err["msg"] == "capture of default/web is not in place: default/web is not captured"


def test_check_needs_prev_result_and_a_version_that_has_check(run_plugin, agent, netns_file):
    _, sock = agent
    assert cni_error(run_plugin("CHECK", config(sock, prevResult=None)))["code"] == 7
    assert cni_error(run_plugin("CHECK", config(sock, "0.3.1")))["code"] == 1


def test_status_reports_whether_the_agent_answers(run_plugin, agent, tmp_path):
    _, sock = agent
    up = run_plugin("STATUS", config(sock, "1.1.0", prevResult=None))
    assert (up.returncode, up.stdout) == (0, b"")

    down = cni_error(run_plugin("STATUS", config(str(tmp_path / "x.sock"), "1.1.0")))
    assert down["code"] == 50


def test_gc_passes_the_valid_attachments_to_the_agent(run_plugin, agent, netns_file):
    handler, sock = agent
    assert run_plugin("ADD", config(sock), netns=netns_file).returncode == 0
    valid = [{"containerID": "other", "ifname": "eth0"}]

    proc = run_plugin(
        "GC", config(sock, "1.1.0", prevResult=None, **{"cni.dev/valid-attachments": valid})
    )

    assert (proc.returncode, proc.stdout) == (0, b"")
    (event,) = handler.events("gc")
    assert event.valid == frozenset({("other", "eth0")})
    assert handler.captured() == set()  # c0ffee was not listed: stale


def test_gc_without_its_attachment_list_is_refused_and_unenrolls_nothing(
    run_plugin, agent, netns_file
):
    handler, sock = agent
    assert run_plugin("ADD", config(sock), netns=netns_file).returncode == 0

    proc = run_plugin("GC", config(sock, "1.1.0", prevResult=None))

    assert cni_error(proc)["code"] == 7
    assert "cni.dev/valid-attachments" in cni_error(proc)["msg"]
    assert handler.events("gc") == []
    assert handler.captured() == {"c0ffee"}


def test_version_lists_what_we_speak(run_plugin):
    proc = run_plugin("VERSION", {"cniVersion": "1.1.0"})
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


@pytest.mark.parametrize(
    ("env", "stdin", "code", "message"),
    [
        ({"CNI_COMMAND": None}, None, 4, "CNI_COMMAND is ''"),
        ({"CNI_COMMAND": "FROB"}, None, 4, "CNI_COMMAND is 'FROB'"),
        ({"CNI_NETNS": None}, None, 4, "ADD needs CNI_NETNS"),
        ({"CNI_CONTAINERID": "", "CNI_IFNAME": None}, None, 4, "CNI_CONTAINERID, CNI_IFNAME"),
        ({"CNI_ARGS": "K8S_POD_NAME"}, None, 4, "CNI_ARGS entry 'K8S_POD_NAME' is not KEY=VALUE"),
        ({}, b"{not json", 6, "not valid JSON"),
        ({}, b"\xff\xfe", 6, "not valid JSON"),
        ({}, b"[1, 2]", 6, "not a JSON object"),
        ({}, {"cniVersion": "2.0.0", "prevResult": PREV_RESULT}, 1, "'2.0.0' is not supported"),
        ({}, {"prevResult": PREV_RESULT}, 1, "None is not supported"),
        ({}, {"cniVersion": "1.0.0"}, 7, "no prevResult: weir-cni is a chained plugin"),
        ({}, {"cniVersion": "1.0.0", "prevResult": []}, 7, "prevResult is not a JSON object"),
        ({}, {"cniVersion": "1.0.0", "prevResult": {"ips": []}}, 7, "prevResult has no IPs"),
        (
            {},
            {"cniVersion": "1.0.0", "prevResult": {"ips": [{"gateway": "10.0.0.1"}]}},
            7,
            "malformed IP entry",
        ),
        (
            {},
            {"cniVersion": "1.0.0", "prevResult": PREV_RESULT, "agentTimeoutSeconds": "soon"},
            7,
            "agentTimeoutSeconds must be a number",
        ),
        (
            {},
            {"cniVersion": "1.0.0", "prevResult": PREV_RESULT, "excludeNamespaces": "a,b"},
            7,
            "excludeNamespaces must be a list",
        ),
    ],
)
def test_bad_input_gives_a_cni_error_and_never_a_traceback(run_plugin, env, stdin, code, message):
    proc = run_plugin("ADD", stdin if stdin is not None else config("/nonexistent.sock"), **env)

    err = cni_error(proc)
    assert err["code"] == code
    assert message in err["msg"] + err.get("details", "")
    assert b"Traceback" not in proc.stderr


def test_many_concurrent_adds_are_all_answered(run_plugin, agent, netns_file):
    handler, sock = agent
    results: list[int] = []

    def one(i: int) -> None:
        env_pod = ("default", f"web-{i}")
        results.append(run_plugin("ADD", config(sock), netns=netns_file, pod=env_pod).returncode)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [0] * 8
    assert len(handler.events("add")) == 8
