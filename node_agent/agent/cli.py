"""`weir agent`: run the node agent (one per node)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from kubernetes import config as k8s_config
from kubernetes.client import ApiClient, Configuration, CoreV1Api

from node_agent.agent.app import CNI_SOCKET_NAME, Agent, AgentSettings
from node_agent.agent.cni_setup import CniSetupSettings
from node_agent.cni_install.cli import DEFAULT_BIN_DIR, DEFAULT_PLUGIN_BUNDLE
from node_agent.cni_install.conflist import PluginSettings
from node_agent.constants import ADMIN_PORT, READINESS_PORT
from node_agent.controlplane_access import ControlPlaneEndpoint, TokenFile
from node_agent.enrollment.enroller import CaptureEngine
from node_agent.redirect.backend import Backend, choose_backend, probe_host
from node_agent.redirect.ebpf.capture import EbpfCapture
from node_agent.redirect.ebpf.pins import CGROUP2_ROOT_ENV, DEFAULT_PIN_ROOT, PinLayout
from node_agent.redirect.host_probes import HostProbes
from node_agent.redirect.iptables import IptablesCapture
from node_agent.redirect.modes import Mode, select_mode
from weir_common.errors import InvalidInputError, TransientError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("agent", help="run the node agent")
    p.add_argument("--node", required=True, help="this node's name in the mesh")
    p.add_argument("--controlplane", default="127.0.0.1:15012", help="control plane host:port")
    trust = p.add_mutually_exclusive_group(required=True)
    trust.add_argument(
        "--controlplane-ca", type=Path, help="mesh root PEM the control plane's TLS chains to"
    )
    trust.add_argument(
        "--controlplane-insecure",
        action="store_true",
        help="plaintext to the control plane (debugging only)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        required=True,
        help="file holding this node's token; read again whenever it changes (rotation)",
    )
    p.add_argument(
        "--kubernetes",
        action="store_true",
        help="follow this node's pods and the namespaces' mesh labels (in-cluster config)",
    )
    p.add_argument(
        "--kubeconfig", type=Path, help="with --kubernetes: this kubeconfig, not the in-cluster one"
    )
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/weir/agent"))
    p.add_argument(
        "--run-dir", type=Path, default=Path("/var/run/weir"), help="CNI and proxy sockets"
    )
    p.add_argument(
        "--redirect-mode",
        choices=list(Mode),
        default=os.environ.get("WEIR_REDIRECT_MODE", "iptables"),
    )
    p.add_argument("--iptables-backend", choices=["auto", *Backend], default="auto")
    p.add_argument("--bpf-pin-root", type=Path, default=DEFAULT_PIN_ROOT)
    p.add_argument(
        "--cgroup2-root",
        type=Path,
        help="the node's cgroup v2 mount point, where eBPF programs attach (default: "
        f"${CGROUP2_ROOT_ENV}, else the first cgroup2 mount); must be the hierarchy's root",
    )
    p.add_argument("--admin-port", type=int, default=ADMIN_PORT, help="admin endpoint on 127.0.0.1")
    p.add_argument("--health-port", type=int, default=READINESS_PORT, help="readiness endpoint")
    cni = p.add_argument_group(
        "CNI installation (Kubernetes nodes; omit in local mode, where the topology has the chain)"
    )
    cni.add_argument("--cni-conf-dir", type=Path, help="e.g. /etc/cni/net.d: keep weir-cni in it")
    cni.add_argument("--cni-bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR))
    cni.add_argument("--cni-plugin-bundle", type=Path, default=Path(DEFAULT_PLUGIN_BUNDLE))
    p.set_defaults(func=_run)


@contextlib.contextmanager
def capture_engine(args: argparse.Namespace) -> Iterator[tuple[CaptureEngine, str]]:
    if args.cgroup2_root is not None:
        # The preflight and the install read it from there, as `weir redirect` does.
        os.environ[CGROUP2_ROOT_ENV] = str(args.cgroup2_root)
    choice, preflight = select_mode(Mode(args.redirect_mode), PinLayout(args.bpf_pin_root))
    if choice.mode == Mode.EBPF:
        compiled = preflight.compiled if preflight is not None else None
        with EbpfCapture(PinLayout(args.bpf_pin_root), precompiled=compiled) as ebpf:
            yield ebpf, "ebpf"
        return
    requested = None if args.iptables_backend == "auto" else Backend(args.iptables_backend)
    backend = choose_backend(requested, probe_host())
    yield IptablesCapture(backend.backend), f"iptables-{backend.backend}"


def _cni_setup(args: argparse.Namespace) -> CniSetupSettings | None:
    if args.cni_conf_dir is None:
        return None
    return CniSetupSettings(
        conf_dir=args.cni_conf_dir,
        bin_dir=args.cni_bin_dir,
        bundle=args.cni_plugin_bundle,
        plugin=PluginSettings(agent_socket=str(args.run_dir / CNI_SOCKET_NAME)),
    )


def kubernetes_api(args: argparse.Namespace) -> CoreV1Api | None:
    """The API client --kubernetes asks for: --kubeconfig's, else the pod's in-cluster config."""
    if args.kubeconfig is not None and not args.kubernetes:
        raise InvalidInputError("--kubeconfig is for --kubernetes")
    if not args.kubernetes:
        return None
    configuration = Configuration()
    try:
        if args.kubeconfig is not None:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(args.kubeconfig), client_configuration=configuration
            )
        else:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except (k8s_config.ConfigException, OSError) as e:
        where = args.kubeconfig or "the in-cluster configuration"
        raise InvalidInputError(f"cannot load Kubernetes client config from {where}: {e}") from None
    return CoreV1Api(ApiClient(configuration))


def _run(args: argparse.Namespace) -> int:
    token = TokenFile(args.token_file)
    try:
        token.token()  # a file that cannot be read at start is a setup error, not a retry
    except TransientError as e:
        raise InvalidInputError(e.message) from None
    kubernetes = kubernetes_api(args)
    endpoint = (
        ControlPlaneEndpoint.insecure(args.controlplane)
        if args.controlplane_insecure
        else ControlPlaneEndpoint.tls(args.controlplane, args.controlplane_ca)
    )
    # Kubelet probes under STRICT: the node's SNAT goes into the backend its
    # other rules (kube-proxy's) use, whatever the pods' capture mode.
    requested = None if args.iptables_backend == "auto" else Backend(args.iptables_backend)
    host_rules = HostProbes(choose_backend(requested, probe_host()).backend)
    with capture_engine(args) as (capture, mode):
        settings = AgentSettings(
            node=args.node,
            controlplane=endpoint,
            token=token,
            state_dir=args.state_dir,
            run_dir=args.run_dir,
            admin_port=args.admin_port,
            health_port=args.health_port,
            cni_setup=_cni_setup(args),
            # The downward API's (deploy/base/agent.yaml): with hostNetwork the
            # hostname is the node's, so it cannot name the agent's pod.
            pod_name=os.environ.get("POD_NAME") if kubernetes is not None else None,
            pod_namespace=os.environ.get("POD_NAMESPACE") if kubernetes is not None else None,
            bpf_pin_root=args.bpf_pin_root,
        )

        async def main() -> int:
            return await Agent(
                settings, capture, mode, kubernetes=kubernetes, host_rules=host_rules
            ).run()

        return asyncio.run(main())
