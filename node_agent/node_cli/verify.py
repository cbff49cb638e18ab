"""`weir node verify`: a preflight of the node, answered from the live system.

Each check reads what is there now: the kernel (through the eBPF preflight's
own probes), the iptables backends' rulesets in this netns, the CNI conf and
bin dirs, /proc. The decisions are pure functions of what was read, so each
is unit-tested with made-up inputs; `verify` only gathers and hands over.

The agent's capture mode says what the node needs: a node in iptables mode
does not need bcc, headers or bpffs, so their absence is reported but is no
problem there. With the agent unreachable, everything is needed, since
nothing says which mode the node will run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from node_agent.cni_install.conflist import PLUGIN_TYPE, is_config_name, primary_config
from node_agent.constants import PROXY_UID
from node_agent.node_cli import render
from node_agent.node_cli.admin_client import Admin, AdminUnreachable
from node_agent.redirect.backend import Backend, choose_backend, probe_host, tool
from node_agent.redirect.ebpf.pins import PinLayout
from node_agent.redirect.ebpf.preflight import Finding, run_preflight
from node_agent.redirect.iptables_model import SaveParseError, owned_tables
from node_agent.redirect.podnet import TCP_LISTEN, TcpSocket, parse_proc_net_tcp
from weir_common.errors import NodeSetupError

DEFAULT_CNI_CONF_DIR: Final = Path("/etc/cni/net.d")
DEFAULT_CNI_BIN_DIR: Final = Path("/opt/cni/bin")
# What only the eBPF mode needs (preflight finding names, and bcc).
EBPF_ONLY: Final = frozenset(
    {"cgroup v2", "bpffs", "BTF", "kernel headers for bcc", "programs", "bcc"}
)
SAVE_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Process:
    pid: int
    name: str
    real_uid: int
    effective_uid: int
    # In the netns verify runs in (the node's); others are pods' (or other nodes' in a local mesh).
    here: bool = True
    parent: int = 0


# -- decisions (pure) ------------------------------------------------------------


def needs_ebpf(mode: str | None) -> bool:
    return mode is None or mode == "ebpf"


def kernel_checks(findings: Sequence[Finding], mode: str | None) -> list[Check]:
    """The eBPF preflight's findings; an eBPF-only failure is no problem in iptables mode."""
    checks = []
    for f in findings:
        if f.ok or f.what not in EBPF_ONLY or needs_ebpf(mode):
            checks.append(Check(f.what, f.ok, f.detail))
        else:
            checks.append(Check(f.what, True, f"not needed in {mode} mode ({f.detail})"))
    return checks


def bcc_check(importable: bool, mode: str | None) -> Check:
    if importable:
        return Check("bcc", True, "python3-bpfcc importable")
    detail = "bcc's Python module is not importable (install python3-bpfcc)"
    if needs_ebpf(mode):
        return Check("bcc", False, detail)
    return Check("bcc", True, f"not needed in {mode} mode ({detail})")


def backend_checks(
    mode: str | None,
    host_rules: Mapping[Backend, int | None],
    weir_rules: Mapping[Backend, int | None],
) -> list[Check]:
    """The backend in use, and whether Weir's rules sit in the other one too.

    `host_rules` is backend.probe_host() (None: unusable); `weir_rules` counts
    Weir's chains and jump rules per backend in this netns (None: unreadable).
    Rules in the backend not in use still run, and its tools are the only
    ones that show them: the nft/legacy mix-up.
    """
    found = {b: n for b, n in weir_rules.items() if n}
    held = ", ".join(f"iptables-{b} {n}" for b, n in sorted(found.items()))
    if mode == "ebpf":
        checks = [Check("iptables backend", True, "not used: capture is eBPF")]
        if len(found) > 1:
            checks.append(
                Check(
                    "WEIR rules in one backend",
                    False,
                    f"Weir's rules are in both backends ({held}); both rulesets run",
                )
            )
        return checks
    in_use: Backend | None = None
    if mode is not None and mode.startswith("iptables-"):
        in_use = Backend(mode.removeprefix("iptables-"))
        why = "the agent's capture mode"
    else:
        try:
            choice = choose_backend(None, host_rules)
        except NodeSetupError as e:
            return [Check("iptables backend", False, e.message)]
        in_use, why = choice.backend, f"agent unknown; it would choose it: {choice.reason}"
    checks = []
    if host_rules.get(in_use) is None:
        checks.append(
            Check(
                "iptables backend",
                False,
                f"iptables-{in_use} ({why}) is not usable here: its save/restore tools are "
                "missing or fail",
            )
        )
    else:
        checks.append(Check("iptables backend", True, f"iptables-{in_use} ({why})"))
    other = Backend.LEGACY if in_use == Backend.NFT else Backend.NFT
    stray = found.get(other, 0)
    if stray:
        checks.append(
            Check(
                "WEIR rules in one backend",
                False,
                f"iptables-{other} holds {stray} Weir rules and chains too, while capture "
                f"uses iptables-{in_use}: both rulesets run, and iptables-{in_use}-save "
                f"does not show them (see iptables-{other}-save)",
            )
        )
    else:
        checks.append(
            Check(
                "WEIR rules in one backend",
                True,
                f"none in iptables-{other}" + (f" ({held})" if held else ""),
            )
        )
    return checks


def cni_checks(
    conf_dir: Path, files: Mapping[str, str] | None, plugin: Path, executable: bool
) -> list[Check]:
    """The runtime's network config (`files`: the conf dir, None if it is missing) and weir-cni."""
    checks = []
    name = primary_config(files) if files is not None else None
    if files is None or name is None:
        what = "does not exist" if files is None else "holds no network config"
        checks.append(Check("CNI config", False, f"{conf_dir} {what}"))
    else:
        checks += _chain_checks(conf_dir / name, files[name])
    if executable:
        checks.append(Check("weir-cni binary", True, str(plugin)))
    else:
        checks.append(Check("weir-cni binary", False, f"{plugin} is missing or not executable"))
    return checks


def _chain_checks(path: Path, text: str) -> list[Check]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        return [Check("CNI config", False, f"{path} is not valid JSON: {e}")]
    if not isinstance(doc, dict):
        return [Check("CNI config", False, f"{path} is not a JSON object")]
    plugins = doc.get("plugins")
    if plugins is None and isinstance(doc.get("type"), str):
        plugins = [doc]  # a single-plugin .conf, as libcni runs it
    if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
        return [Check("CNI config", False, f"{path}: 'plugins' is not a list of objects")]
    types = [str(p.get("type")) for p in plugins]
    checks = [Check("CNI config", True, f"{path}: {' -> '.join(types)}")]
    count = types.count(PLUGIN_TYPE)
    if count == 0:
        checks.append(Check("weir-cni in chain", False, f"weir-cni is not in {path}"))
    elif count > 1:
        checks.append(Check("weir-cni in chain", False, f"weir-cni is in {path} {count} times"))
    elif types[-1] != PLUGIN_TYPE:
        after = ", ".join(types[types.index(PLUGIN_TYPE) + 1 :])
        checks.append(
            Check(
                "weir-cni in chain",
                False,
                f"weir-cni is not last in {path}: {after}"
                " run after it, so pods it captures may be changed after capture",
            )
        )
    else:
        checks.append(Check("weir-cni in chain", True, f"last of {len(types)} in {path}"))
    return checks


def uid_check(processes: Sequence[Process], proxy_pids: Collection[int]) -> Check:
    """Capture lets UID 1337 through unredirected: only the proxy may run as it.

    `proxy_pids` are the processes holding the proxy's admin listener: the
    pid the proxy reports is that of its own pid namespace (a pod's on
    Kubernetes), which /proc here may not show under that number.
    """
    others = [
        p
        for p in processes
        if PROXY_UID in (p.real_uid, p.effective_uid) and p.pid not in proxy_pids
    ]
    if others:
        listed = ", ".join(
            f"{p.pid} ({p.name}{'' if p.here else ', another netns'})" for p in others
        )
        return Check(
            f"UID {PROXY_UID}",
            False,
            f"not the proxy{'' if proxy_pids else ' (no proxy found)'}, yet "
            f"running as UID {PROXY_UID}, so capture lets its traffic through: {listed}",
        )
    if not proxy_pids:
        return Check(f"UID {PROXY_UID}", True, "no process runs as it")
    pids = ", ".join(str(pid) for pid in sorted(proxy_pids))
    return Check(f"UID {PROXY_UID}", True, f"the proxy (pid {pids}) only")


def with_workers(owners: Collection[int], processes: Iterable[Process]) -> set[int]:
    """The proxy's processes: those holding its admin listener (the first worker) and
    the UID 1337 children they forked (its other workers, `--workers`)."""
    return set(owners) | {
        p.pid
        for p in processes
        if p.parent in owners and PROXY_UID in (p.real_uid, p.effective_uid)
    }


def listening_inodes(sockets: Iterable[TcpSocket], port: int) -> set[int]:
    """Socket inodes listening on loopback `port`: the proxy's admin listener."""
    return {
        s.inode
        for s in sockets
        if s.state == TCP_LISTEN and s.local[1] == port and s.local[0].is_loopback
    }


def parse_status(pid: int, text: str) -> Process | None:
    """/proc/PID/status as a Process; None if it lacks the fields (never for a live one)."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    uids = fields.get("Uid", "").split()
    if len(uids) < 2 or not all(u.isdigit() for u in uids[:2]):
        return None
    parent = fields.get("PPid", "").strip()
    return Process(
        pid,
        fields.get("Name", "").strip(),
        int(uids[0]),
        int(uids[1]),
        parent=int(parent) if parent.isdigit() else 0,
    )


def count_owned(save_output: str) -> int:
    """Weir's chains plus the jumps into them in one `*-save` output."""
    return sum(len(t.chains) + len(t.jumps) for t in owned_tables(save_output).values())


# -- reading the live system -------------------------------------------------------


def _processes(proc: Path = Path("/proc")) -> list[Process]:
    # thread-self: `ip netns exec` or a test may have moved only this thread.
    here = (proc / "thread-self" / "ns" / "net").readlink()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "status").read_text()
            netns = (entry / "ns" / "net").readlink()
        except OSError:
            continue  # exited while we looked
        process = parse_status(int(entry.name), text)
        if process is not None:
            found.append(replace(process, here=netns == here))
    return found


def running_proxy(admin_port: int) -> tuple[list[Process], set[int]]:
    """Every process here, and the pids of the proxy whose admin listens on `admin_port`."""
    processes = _processes()
    as_proxy = [p for p in processes if PROXY_UID in (p.real_uid, p.effective_uid)]
    inodes = listening_inodes(_loopback_sockets(), admin_port)
    return processes, with_workers(_owners(inodes, as_proxy), as_proxy)


def _owners(
    inodes: set[int], candidates: Iterable[Process], proc: Path = Path("/proc")
) -> set[int]:
    """Which of `candidates` hold one of the socket `inodes` open."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    owners = set()
    for process in candidates:
        try:
            links = [str(fd.readlink()) for fd in (proc / str(process.pid) / "fd").iterdir()]
        except OSError:
            continue  # exited, or its fds closed while we looked
        if wanted.intersection(links):
            owners.add(process.pid)
    return owners


def _loopback_sockets() -> list[TcpSocket]:
    sockets: list[TcpSocket] = []
    for family, table in ((4, "tcp"), (6, "tcp6")):
        path = Path(f"/proc/thread-self/net/{table}")
        if path.exists():
            sockets += parse_proc_net_tcp(path.read_text(), family)
    return sockets


def _weir_rules(host_rules: Mapping[Backend, int | None]) -> dict[Backend, int | None]:
    counts: dict[Backend, int | None] = {}
    for backend in Backend:
        if host_rules.get(backend) is None:
            counts[backend] = None
            continue
        total: int | None = 0
        for family in (4, 6):
            proc = subprocess.run(
                [tool(backend, family, "save")],
                capture_output=True,
                text=True,
                check=False,
                timeout=SAVE_TIMEOUT_S,
            )
            try:
                n = count_owned(proc.stdout) if proc.returncode == 0 else None
            except SaveParseError:
                n = None
            total = None if total is None or n is None else total + n
        counts[backend] = total
    return counts


def _conf_dir(conf_dir: Path) -> dict[str, str] | None:
    if not conf_dir.is_dir():
        return None
    files = {}
    for path in conf_dir.iterdir():
        if is_config_name(path.name) and path.is_file():
            files[path.name] = path.read_text(errors="replace")
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cni-conf-dir",
        type=Path,
        default=DEFAULT_CNI_CONF_DIR,
        help=f"the container runtime's CNI config dir (default {DEFAULT_CNI_CONF_DIR})",
    )
    parser.add_argument(
        "--cni-bin-dir",
        type=Path,
        default=DEFAULT_CNI_BIN_DIR,
        help=f"where the runtime finds CNI plugins (default {DEFAULT_CNI_BIN_DIR})",
    )


def answer(args: argparse.Namespace) -> tuple[dict[str, Any], str, list[str]]:
    """Data, table and problems, as `weir node` prints them."""
    data = gather(
        args,
        Admin("agent", "127.0.0.1", args.agent_admin),
        Admin("proxy", "127.0.0.1", args.proxy_admin),
    )
    return data, text(data), problems(data)


def gather(args: argparse.Namespace, agent: Admin, proxy: Admin) -> dict[str, Any]:
    """Every check, in the order an operator reads them."""
    checks: list[Check] = []
    node: str | None = None
    mode: str | None = None
    try:
        node = agent.section("node")["node"]
        mode = agent.section("capture")["mode"]
    except AdminUnreachable as e:
        checks.append(Check("agent", False, str(e)))
    else:
        checks.append(Check("agent", True, f"capture mode {mode}"))
    proxy_pid: int | None = None
    try:
        proxy_pid = int(proxy.section("node")["pid"])
    except AdminUnreachable as e:
        checks.append(Check("proxy", False, str(e)))
    else:
        checks.append(Check("proxy", True, f"pid {proxy_pid}"))
    # No load test: verify only looks, and a load would compete with a running agent.
    preflight = run_preflight(PinLayout(args.bpf_pin_root), load_test=False)
    checks += kernel_checks(preflight.findings, mode)
    checks.append(bcc_check(importlib.util.find_spec("bcc") is not None, mode))
    host_rules = probe_host()
    checks += backend_checks(mode, host_rules, _weir_rules(host_rules))
    plugin = args.cni_bin_dir / PLUGIN_TYPE
    checks += cni_checks(
        args.cni_conf_dir,
        _conf_dir(args.cni_conf_dir),
        plugin,
        plugin.is_file() and os.access(plugin, os.X_OK),
    )
    processes, proxy_processes = running_proxy(args.proxy_admin)
    checks.append(uid_check(processes, proxy_processes))
    return {"node": node, "mode": mode, "checks": [asdict(c) for c in checks]}


def text(data: Mapping[str, Any]) -> str:
    return render.table(
        ["check", "result", "detail"],
        [(c["name"], "ok" if c["ok"] else "PROBLEM", c["detail"]) for c in data["checks"]],
    )


def problems(data: Mapping[str, Any]) -> list[str]:
    return [f"{c['name']}: {c['detail']}" for c in data["checks"] if not c["ok"]]
