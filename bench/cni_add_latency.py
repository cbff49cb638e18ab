"""CNI ADD latency with weir-cni in the chain (run by hand as root, not a test).

    .venv/bin/python bench/cni_add_latency.py [--rounds 50] [--plugin-rounds 200]

Builds the bundle (scripts/build-cni-plugin.sh), serves a test agent
(RecordingHandler) in this process, and measures inside a throwaway node netns:

1. the whole chain's ADD as a runtime runs it (cni_runtime.invoke_chain), for
   bridge + host-local alone, with weir-cni appended (the bundle's C front end),
   and with the frozen Python plugin alone in its place (`weir-cni-py`, what
   weir-cni was before the front end): the differences are what weir costs a
   pod's start;
2. VERSION and ADD of the plugin alone, given a fixed prevResult: the front
   end, the frozen Python plugin, and `python -m cni_plugin`.

Each ADD is followed by an untimed DEL, so every round starts from the same state.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from node_agent.cni_events.server import CniEventServer
from node_agent.cni_install.conflist import PluginSettings
from node_agent.cni_install.installer import install_plugin_binary
from node_agent.localmesh.cni_runtime import invoke_chain
from node_agent.localmesh.conflists import node_conflist
from node_agent.localmesh.topology import CNI_BIN_DIR, LocalTopology
from node_agent.netns import Netns
from testbed.cni_fakes import RecordingHandler

REPO = Path(__file__).resolve().parents[1]


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):6.1f} ms   p99 {p99:6.1f} ms   (n={len(ms)})"


def chain_rounds(conflist, rounds, *, pod_netns, node, cni_path) -> list[float]:
    args = {
        "container_id": "bench",
        "netns_path": pod_netns.path,
        "ifname": "eth0",
        "cni_path": cni_path,
        "cni_args": {
            "IgnoreUnknown": "1",
            "K8S_POD_NAMESPACE": "bench",
            "K8S_POD_NAME": "pod",
            "K8S_POD_UID": "u",
        },
        "netns": node.netns,
    }
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = invoke_chain(conflist, "ADD", **args)
        samples.append(time.perf_counter() - started)
        invoke_chain(conflist, "DEL", **args, prev_result=result)
    return samples


def plugin_rounds(argv, command, rounds, *, pod_netns, socket_path) -> list[float]:
    stdin = json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "bench",
            "type": "weir-cni",
            "agentSocket": socket_path,
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.244.9.2/24"}]},
        }
    )
    env = os.environ | {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "bench",
        "CNI_NETNS": str(pod_netns.path),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(CNI_BIN_DIR),
        "CNI_ARGS": "K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod",
    }
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        proc = subprocess.run(
            argv, input=stdin, env=env, capture_output=True, text=True, cwd=REPO, check=False
        )
        samples.append(time.perf_counter() - started)
        if proc.returncode != 0:
            sys.exit(f"weir-cni failed: {proc.stdout} {proc.stderr}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--plugin-rounds", type=int, default=200)
    args = parser.parse_args()

    subprocess.run(["scripts/build-cni-plugin.sh"], cwd=REPO, check=True)
    bundle = REPO / "build" / "cni-plugin" / "weir-cni"
    work = Path(tempfile.mkdtemp(prefix="weirbench-"))
    try:
        bin_dir = work / "bin"
        bin_dir.mkdir()
        install_plugin_binary(bundle, bin_dir)
        # The same bundle with the frozen Python plugin as weir-cni: the baseline.
        py_bin_dir = work / "py-bin"
        py_bin_dir.mkdir()
        (py_bin_dir / "weir-cni").symlink_to(
            (bin_dir / "weir-cni").resolve().parent / "weir-cni-py"
        )
        cni_path = [CNI_BIN_DIR, bin_dir]
        with (
            CniEventServer(work / "cni.sock", RecordingHandler()) as server,
            LocalTopology(cni_path=cni_path) as topology,
        ):
            node = topology.add_node("bench", "10.244.9.0/24")
            pod_name = f"{topology.prefix}-pod-bench"
            subprocess.run(["ip", "netns", "add", pod_name], check=True)
            try:
                pod_netns = Netns.validate(f"/var/run/netns/{pod_name}")
                weir = PluginSettings(agent_socket=str(server.socket_path)).entry()
                base = {
                    "network": "bench",
                    "bridge": node.bridge,
                    "pod_cidr_v4": node.pod_cidr_v4,
                    "pod_cidr_v6": None,
                    "ipam_data_dir": topology.work_dir / "host-local",
                }
                plain = node_conflist(**base)
                chained = node_conflist(**base, chained_plugins=[weir])
                common = {"pod_netns": pod_netns, "node": node}
                py_path = {"cni_path": [CNI_BIN_DIR, py_bin_dir]}
                chain_rounds(chained, 3, **common, cni_path=cni_path)  # warm the page cache
                chain_rounds(chained, 3, **common, **py_path)
                chains = {
                    "bridge + host-local": chain_rounds(
                        plain, args.rounds, **common, cni_path=cni_path
                    ),
                    "... + weir-cni (front end)": chain_rounds(
                        chained, args.rounds, **common, cni_path=cni_path
                    ),
                    "... + weir-cni-py (frozen Python)": chain_rounds(
                        chained, args.rounds, **common, **py_path
                    ),
                }
                plugin = {"pod_netns": pod_netns, "socket_path": str(server.socket_path)}
                alone = {}
                for command in ("VERSION", "ADD"):
                    alone[f"{command}, weir-cni (front end)"] = plugin_rounds(
                        [str(bin_dir / "weir-cni")], command, args.plugin_rounds, **plugin
                    )
                    alone[f"{command}, weir-cni-py (frozen Python)"] = plugin_rounds(
                        [str(py_bin_dir / "weir-cni")], command, args.plugin_rounds // 4, **plugin
                    )
                    alone[f"{command}, python -m cni_plugin"] = plugin_rounds(
                        [sys.executable, "-m", "cni_plugin"],
                        command,
                        args.plugin_rounds // 4,
                        **plugin,
                    )
            finally:
                subprocess.run(["ip", "netns", "delete", pod_name], check=False)
    finally:
        shutil.rmtree(work)

    for name, samples in chains.items():
        print(f"chain ADD, {name:36} {summary(samples)}")
    for name, samples in alone.items():
        print(f"alone, {name:40} {summary(samples)}")


if __name__ == "__main__":
    main()
