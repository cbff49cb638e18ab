"""Compile bpf/ with bcc, pin and attach it node-wide, or remove all of it.

Install steps, in order: compile (clang, in bcc) -> load every program
(verifier) -> pin the maps and the sk_lookup program -> link the cgroup
programs at the cgroup v2 root and pin the links. Nothing is pinned before
every program loaded (a verifier rejection leaves the node as it was), and a
failure while pinning or linking removes what this install pinned. Once the
links are pinned, no process needs to stay alive for capture to work.

bcc needs kernel headers matching the running kernel's UAPI. Weir keeps its
own merged tree (`make deps`: build/bcc-kernel-source, Debian's -common and
-amd64 header packages as one directory) and hands it to bcc through
BCC_KERNEL_SOURCE; /lib/modules is never written. Without that tree (an
installed agent) bcc uses the host's own headers under /lib/modules.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from node_agent.redirect.ebpf import sys_bpf
from node_agent.redirect.ebpf.maps import (
    LAYOUT_VERSION,
    MAP_SPECS,
    META_MAP,
    META_SPEC,
    MapName,
    MapSpec,
    config_header,
    decode_layout_version,
    encode_layout_version,
    spec_differences,
)
from node_agent.redirect.ebpf.pins import PinLayout, cgroup2_root, ensure_bpffs
from node_agent.redirect.ebpf.sys_bpf import AttachType, ProgType
from weir_common.errors import NodeSetupError

log = logging.getLogger(__name__)

CHECKOUT: Final = Path(__file__).resolve().parents[3]
# The image (or a packaged install) can point elsewhere; a checkout needs nothing.
BPF_DIR_ENV: Final = "WEIR_BPF_DIR"
KERNEL_SOURCE_ENV: Final = "WEIR_BCC_KERNEL_SOURCE"
_HEADERS_STAMP: Final = ".complete"  # written last by scripts/merge-kernel-headers.sh
_LOG_TAIL_LINES: Final = 25
_T = TypeVar("_T")


@dataclass(frozen=True)
class Program:
    func: str
    source: str
    prog_type: ProgType
    attach_type: AttachType
    # Node-wide programs are linked at the cgroup v2 root; the others are
    # pinned as programs and linked into each pod's netns by the capture.
    node_wide: bool


PROGRAMS: Final = (
    Program(
        "weir_connect4",
        "cgroup_connect4.c",
        ProgType.CGROUP_SOCK_ADDR,
        AttachType.CGROUP_INET4_CONNECT,
        True,
    ),
    Program(
        "weir_connect6",
        "cgroup_connect6.c",
        ProgType.CGROUP_SOCK_ADDR,
        AttachType.CGROUP_INET6_CONNECT,
        True,
    ),
    Program(
        "weir_sockops", "cgroup_sockops.c", ProgType.SOCK_OPS, AttachType.CGROUP_SOCK_OPS, True
    ),
    Program(
        "weir_getsockopt",
        "cgroup_getsockopt.c",
        ProgType.CGROUP_SOCKOPT,
        AttachType.CGROUP_GETSOCKOPT,
        True,
    ),
    Program("weir_sk_lookup", "sk_lookup.c", ProgType.SK_LOOKUP, AttachType.SK_LOOKUP, False),
)
SK_LOOKUP: Final = PROGRAMS[-1]


def bpf_dir() -> Path:
    return Path(os.environ.get(BPF_DIR_ENV) or CHECKOUT / "bpf")


def host_headers() -> Path:
    """Where bcc itself looks for the running kernel's headers (a distribution's package)."""
    return Path("/lib/modules") / platform.release() / "build"


def kernel_source() -> Path:
    """$WEIR_BCC_KERNEL_SOURCE, else the checkout's merged tree, else the host's headers."""
    configured = os.environ.get(KERNEL_SOURCE_ENV)
    if configured:
        return Path(configured)
    merged = CHECKOUT / "build" / "bcc-kernel-source"
    if not (merged / _HEADERS_STAMP).is_file() and host_headers().is_dir():
        return host_headers()
    return merged


def headers_in_use(source: Path) -> str:
    """Which headers `source` holds; NodeSetupError if it is unusable."""
    stamp = source / _HEADERS_STAMP
    if stamp.is_file():
        return f"{stamp.read_text().strip()} (merged tree at {source})"
    if source == host_headers() and (source / "include").is_dir():
        return f"the host's headers at {source.resolve()}"
    raise NodeSetupError(
        f"kernel headers for bcc not found: {source} is missing or incomplete, and so is "
        f"{host_headers()}. bcc needs headers for the running kernel: install the "
        "distribution's headers package on the node (in Kubernetes the agent mounts the "
        "node's /lib/modules and /usr/src), or, for a kernel that ships none, build Weir's "
        "merged tree with `make deps` (scripts/merge-kernel-headers.sh) and point "
        f"${KERNEL_SOURCE_ENV} at it"
    )


# Shared headers, in dependency order. bcc only turns functions and maps
# written in its main file into programs and maps, so everything is pasted
# into one text (the headers' include guards make the sources' own
# #include lines no-ops); #line keeps compiler messages pointing at bpf/.
LIB_HEADERS: Final = ("lib/weir_maps.h", "lib/weir_policy.h")


def program_text(directory: Path, programs: tuple[Program, ...] = PROGRAMS) -> str:
    """What bcc compiles: the generated config header, bpf/lib, one file per attach point."""
    parts = [config_header()]
    for name in (*LIB_HEADERS, *(p.source for p in programs)):
        path = directory / name
        parts.append(f'#line 1 "{path}"\n{path.read_text()}')
    return "".join(parts)


def explain_load_failure(what: str, output: str) -> str:
    """One operator-facing message from clang's or the verifier's output."""
    lines = [line for line in output.splitlines() if line.strip()]
    hint = ""
    text = "\n".join(lines)
    if "cannot use helper" in text or "unknown func" in text or "invalid func" in text:
        hint = "the running kernel lacks a helper this program needs; "
    elif "No such file or directory" in text and ".h" in text:
        hint = "a header is missing from the kernel headers given to bcc; "
    tail = "\n    ".join(lines[-_LOG_TAIL_LINES:]) or "(no compiler or verifier output)"
    return f"{what}: {hint}compiler/verifier said:\n    {tail}"


def _bcc_step(what: str, step: Callable[[], _T]) -> _T:
    """Run one bcc call, turning its failure into a NodeSetupError that quotes
    what bcc's C++ side wrote on fd 2 (clang errors, the verifier log)."""
    saved = os.dup(2)
    # In memory: the agent's container has a read-only root and no /tmp.
    with os.fdopen(os.memfd_create("weir-bcc-stderr", os.MFD_CLOEXEC), "w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            return step()
        except Exception as e:  # bcc raises bare Exception for everything
            os.dup2(saved, 2)
            tmp.seek(0)
            output = tmp.read().decode(errors="replace")
            raise NodeSetupError(explain_load_failure(f"{what} ({e})", output)) from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass
class Compiled:
    """Programs loaded into the kernel (verified), not yet pinned or attached."""

    bpf: Any  # bcc.BPF: untyped
    prog_fds: dict[str, int]
    headers: str

    def map_fd(self, name: MapName) -> int:
        # bcc's table wrappers do not know sockhash; its C API gives any map's fd.
        from bcc.libbcc import lib  # noqa: PLC0415 - see compile_and_load

        fd = int(lib.bpf_table_fd(self.bpf.module, name.value.encode()))
        if fd < 0:
            raise NodeSetupError(f"bcc created no map {name} (bpf/lib/weir_maps.h out of sync?)")
        return fd

    def close(self) -> None:
        self.bpf.cleanup()


def compile_and_load(
    programs: tuple[Program, ...] = PROGRAMS, *, text: str | None = None
) -> Compiled:
    """Compile and verify; raises NodeSetupError saying exactly what failed."""
    source = kernel_source()
    headers = headers_in_use(source)
    try:
        from bcc import BPF  # noqa: PLC0415 - bcc loads libclang; only eBPF mode needs it
    except ImportError as e:
        raise NodeSetupError(
            f"bcc's Python module is not importable ({e}): install python3-bpfcc "
            "(make deps links it into the virtualenv)"
        ) from None
    previous = os.environ.get("BCC_KERNEL_SOURCE")
    if source == host_headers():
        # bcc's own default: it also follows Debian's split of build/ and source/.
        os.environ.pop("BCC_KERNEL_SOURCE", None)
    else:
        os.environ["BCC_KERNEL_SOURCE"] = str(source)
    loaded: Any = None
    try:
        loaded = _bcc_step(
            "compiling bpf/ with bcc failed",
            lambda: BPF(
                text=(text or program_text(bpf_dir(), programs)).encode(),
                cflags=[f"-I{bpf_dir()}"],
            ),
        )
        fds: dict[str, int] = {}
        for p in programs:
            fn = _bcc_step(
                f"the kernel refused program {p.func}",
                functools.partial(
                    loaded.load_func, p.func.encode(), p.prog_type, attach_type=p.attach_type
                ),
            )
            fds[p.func] = int(fn.fd)
    except BaseException:
        if loaded is not None:
            loaded.cleanup()
        raise
    finally:
        if previous is None:
            os.environ.pop("BCC_KERNEL_SOURCE", None)
        else:
            os.environ["BCC_KERNEL_SOURCE"] = previous
    log.info("bcc compiled and loaded %d programs with headers %s", len(fds), headers)
    return Compiled(loaded, fds, headers)


@dataclass(frozen=True)
class InstallState:
    present: tuple[Path, ...]
    missing: tuple[Path, ...]

    @property
    def installed(self) -> bool:
        return not self.missing

    @property
    def absent(self) -> bool:
        return not self.present

    @property
    def unversioned(self) -> bool:
        """Complete but for the layout version: an install by an agent older than versions."""
        return [p.name for p in self.missing] == [META_MAP]


def node_pins(layout: PinLayout) -> list[Path]:
    """The pins a complete node-wide install consists of."""
    pins = [layout.map(m.value) for m in MapName] + [layout.map(META_MAP)]
    pins += [layout.link(p.func) if p.node_wide else layout.prog(p.func) for p in PROGRAMS]
    return pins


def install_state(layout: PinLayout) -> InstallState:
    pins = node_pins(layout)
    return InstallState(
        tuple(p for p in pins if p.exists()), tuple(p for p in pins if not p.exists())
    )


@dataclass(frozen=True)
class InstallReport:
    installed_now: bool
    detail: str


def install(layout: PinLayout, compiled: Compiled | None = None) -> InstallReport:
    """Make the node-wide part present; a no-op (no compile) when it already is."""
    mounted = ensure_bpffs(layout.root)
    state = install_state(layout)
    if state.installed or state.unversioned:
        if compiled is not None:
            compiled.close()
        require_compatible(layout)
        return InstallReport(False, f"already installed at {layout.root} (layout {LAYOUT_VERSION})")
    if not state.absent:
        _remove_partial(layout, state)
    cgroup = cgroup2_root()
    compiled = compiled or compile_and_load()
    pinned: list[Path] = []
    try:
        _require_specs(compiled)
        for sub in ("maps", "progs", "links", "pods"):
            (layout.root / sub).mkdir(parents=True, exist_ok=True)
        # First, so an install cut short shows as partial: only an older agent's
        # install is complete without it.
        _pin_meta(layout)
        pinned.append(layout.map(META_MAP))
        for m in MapName:
            sys_bpf.obj_pin(compiled.map_fd(m), str(layout.map(m.value)))
            pinned.append(layout.map(m.value))
        sys_bpf.obj_pin(compiled.prog_fds[SK_LOOKUP.func], str(layout.prog(SK_LOOKUP.func)))
        pinned.append(layout.prog(SK_LOOKUP.func))
        cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for p in PROGRAMS:
                if p.node_wide:
                    _link_at_root(compiled.prog_fds[p.func], cgroup_fd, p, layout, cgroup)
                    pinned.append(layout.link(p.func))
        finally:
            os.close(cgroup_fd)
    except BaseException:
        for path in reversed(pinned):
            path.unlink(missing_ok=True)
        _remove_dirs(layout)
        raise
    finally:
        compiled.close()
    detail = f"installed at {layout.root}, attached at cgroup v2 root {cgroup}"
    detail += f"; bcc kernel headers: {compiled.headers}"
    if mounted:
        detail += f"; {mounted}"
    log.info("eBPF capture %s", detail)
    return InstallReport(True, detail)


def _remove_partial(layout: PinLayout, state: InstallState) -> None:
    """Remove a partial install no pod depends on; NodeSetupError if one may."""
    missing = ", ".join(str(p.relative_to(layout.root)) for p in state.missing)
    if layout.pod_links():
        raise NodeSetupError(
            f"partial eBPF install at {layout.root} (missing: {missing}) with pods linked "
            "to it; run `weir redirect uninstall-ebpf` and apply again"
        )
    # What an install killed half-way leaves (or a half-removed one): no pod is
    # linked to it, so nothing depends on it, and refusing would wedge every ADD
    # on the node until someone came to clean up.
    log.warning("replacing a partial eBPF install at %s (missing: %s)", layout.root, missing)
    uninstall(layout)


def _require_specs(compiled: Compiled) -> None:
    drift = [
        d for m in MapName for d in spec_differences(m, _shape(compiled.map_fd(m)), MAP_SPECS[m])
    ]
    if drift:
        raise NodeSetupError(
            "bpf/lib/weir_maps.h and MAP_SPECS in node_agent/redirect/ebpf/maps.py "
            f"disagree (change both together): {'; '.join(drift)}"
        )


def _shape(fd: int) -> MapSpec:
    info = sys_bpf.map_info(fd)
    return MapSpec(info.type, info.key_size, info.value_size, info.max_entries, info.flags)


def _pin_meta(layout: PinLayout) -> None:
    fd = sys_bpf.map_create(
        sys_bpf.MapType(META_SPEC.type),
        META_SPEC.key_size,
        META_SPEC.value_size,
        META_SPEC.max_entries,
        META_MAP,
    )
    try:
        sys_bpf.map_update(fd, bytes(META_SPEC.key_size), encode_layout_version(LAYOUT_VERSION))
        sys_bpf.obj_pin(fd, str(layout.map(META_MAP)))
    finally:
        os.close(fd)


def incompatibilities(layout: PinLayout) -> list[str]:
    """How the maps pinned under `layout` differ from what this agent installs; empty if none.

    Pins outlive the agent that made them, so a new agent may find an older
    (or newer) one's. Reusing maps of another shape would make every map
    write fail or, worse, be read by the programs as something else.
    """
    out = []
    for name, spec in (*MAP_SPECS.items(), (META_MAP, META_SPEC)):
        try:
            fd = sys_bpf.obj_get(str(layout.map(name)))
        except FileNotFoundError:
            if name == META_MAP:
                out.append(f"{name}: missing (pinned by a Weir agent from before layout versions)")
            continue  # install_state reports other missing pins
        try:
            differences = spec_differences(name, _shape(fd), spec)
            out += differences
            if name == META_MAP and not differences:
                raw = sys_bpf.map_lookup(fd, bytes(spec.key_size), spec.value_size)
                found = decode_layout_version(raw) if raw is not None else 0
                if found != LAYOUT_VERSION:
                    out.append(f"layout version {found}, this agent's is {LAYOUT_VERSION}")
        finally:
            os.close(fd)
    return out


def require_compatible(layout: PinLayout) -> None:
    """NodeSetupError saying what differs when the pins cannot be reused; touches nothing."""
    found = incompatibilities(layout)
    if found:
        raise NodeSetupError(
            f"eBPF pins at {layout.root} were made by an incompatible Weir: "
            f"{'; '.join(found)}. Nothing was changed. Remove them with "
            f"`weir redirect uninstall-ebpf --bpf-pin-root {layout.root}` (capture stops on this "
            "node until pods are applied again), then restart the agent"
        )


def _link_at_root(prog_fd: int, cgroup_fd: int, p: Program, layout: PinLayout, at: Path) -> None:
    try:
        link_fd = sys_bpf.link_create(prog_fd, cgroup_fd, p.attach_type)
    except OSError as e:
        raise NodeSetupError(
            f"cannot attach {p.func} at cgroup {at}: {e.strerror}. A program attached there "
            "without BPF_F_ALLOW_MULTI does not allow others beside it; Weir never replaces "
            "it (bpftool cgroup show shows who attached it)"
        ) from None
    try:
        sys_bpf.obj_pin(link_fd, str(layout.link(p.func)))
    finally:
        os.close(link_fd)


def _remove_dirs(layout: PinLayout) -> None:
    for sub in ("maps", "progs", "links", "pods", ""):
        with contextlib.suppress(FileNotFoundError, OSError):
            (layout.root / sub).rmdir()


def uninstall(layout: PinLayout) -> list[str]:
    """Remove every pin under the root: links detach, programs and maps are freed.

    Objects go away once no fd refers to them either, so callers close theirs
    first (EbpfCapture.close). Returns what was removed, relative to the root.
    """
    removed = []
    for path in layout.all_pins():
        path.unlink()
        removed.append(str(path.relative_to(layout.root)))
    _remove_dirs(layout)
    if layout.root.exists():
        raise NodeSetupError(f"{layout.root} still holds something Weir did not pin; left it")
    return removed
