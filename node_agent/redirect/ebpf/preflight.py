"""Can this node run the eBPF mode? Each requirement checked, and why not, in words.

The checks follow what actually breaks peers' eBPF modes: no cgroup v2, no
bpffs to pin on, no kernel headers for bcc, a kernel that lacks a helper or
whose verifier rejects a program. The last one is only known by loading, so
the preflight compiles and loads every program (without attaching) and
hands the result to the install, which then does not compile again.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from node_agent.redirect.ebpf import loader
from node_agent.redirect.ebpf.pins import (
    BPFFS,
    NO_NODE_BPFFS,
    PinLayout,
    cgroup2_root,
    in_kubernetes_pod,
    mount_of,
    read_mounts,
)
from weir_common.errors import NodeSetupError

BTF_VMLINUX: Final = Path("/sys/kernel/btf/vmlinux")


@dataclass(frozen=True)
class Finding:
    what: str
    ok: bool
    detail: str


@dataclass
class Preflight:
    findings: list[Finding] = field(default_factory=list)
    # Loaded, verified programs, when the load test ran and passed.
    compiled: loader.Compiled | None = None

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def failures(self) -> list[str]:
        return [f"{f.what}: {f.detail}" for f in self.findings if not f.ok]

    def lines(self) -> list[str]:
        return [f"{'ok  ' if f.ok else 'FAIL'} {f.what}: {f.detail}" for f in self.findings]


def _bpffs(layout: PinLayout) -> Finding:
    mount = mount_of(layout.root, read_mounts())
    if mount is not None and mount.fstype == "bpf":
        return Finding("bpffs", True, f"{mount.mount_point} (pins under {layout.root})")
    if BPFFS in layout.root.parents:
        if in_kubernetes_pod():
            return Finding("bpffs", False, NO_NODE_BPFFS)
        return Finding("bpffs", True, f"not mounted; install mounts it at {BPFFS}")
    return Finding("bpffs", False, f"{layout.root} is not on a bpf filesystem")


def run_preflight(layout: PinLayout, *, load_test: bool = True) -> Preflight:
    """Every check, in order; the load test only when all else passed and nothing is installed."""
    pf = Preflight()
    pf.findings.append(Finding("kernel", True, platform.release()))
    try:
        pf.findings.append(Finding("cgroup v2", True, f"root at {cgroup2_root()}"))
    except NodeSetupError as e:
        pf.findings.append(Finding("cgroup v2", False, e.message))
    pf.findings.append(_bpffs(layout))
    pf.findings.append(
        Finding(
            "BTF",
            True,
            f"{BTF_VMLINUX} present" if BTF_VMLINUX.exists() else "no kernel BTF (bcc needs none)",
        )
    )
    try:
        pf.findings.append(
            Finding("kernel headers for bcc", True, loader.headers_in_use(loader.kernel_source()))
        )
    except NodeSetupError as e:
        pf.findings.append(Finding("kernel headers for bcc", False, e.message))
    state = loader.install_state(layout)
    if state.installed or state.unversioned:
        try:
            loader.require_compatible(layout)
        except NodeSetupError as e:
            pf.findings.append(Finding("programs", False, e.message))
        else:
            pf.findings.append(
                Finding("programs", True, f"already installed and pinned at {layout.root}")
            )
        return pf
    if not state.absent:
        missing = ", ".join(str(p.relative_to(layout.root)) for p in state.missing)
        partial = f"partial install at {layout.root} (missing: {missing})"
        if layout.pod_links():
            pf.findings.append(Finding("programs", False, f"{partial} with pods linked to it"))
            return pf
        # An install cut short: install replaces it (loader._remove_partial).
        pf.findings.append(Finding("programs", True, f"{partial}, no pod linked: replaced"))
    if not load_test or not pf.ok:
        return pf
    try:
        pf.compiled = loader.compile_and_load()
    except NodeSetupError as e:
        pf.findings.append(Finding("program load test", False, e.message))
    else:
        pf.findings.append(
            Finding("program load test", True, f"{len(pf.compiled.prog_fds)} programs verified")
        )
    return pf
