"""Applying conflist.py's changes to the host: the plugin binary and the conf dir.

The binary: the self-contained one-directory bundle (scripts/build-cni-plugin.sh)
is copied to `<bin dir>/.weir-cni/<content digest>/`, and `<bin dir>/weir-cni`
is a relative symlink to the executable in it, swapped by a rename: a runtime
starting the plugin during an upgrade runs the old build or the new one, never
half a copy. Relative, because the agent sees the host's bin dir under another
mount point than the runtime does.

The conf dir: every change is made under an exclusive flock on the directory
(two installers never interleave), each file is written to a temporary name in
the same directory (a suffix no runtime reads) with the mode and owner of the
file it replaces, fsynced, and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from node_agent.cni_install import conflist
from node_agent.cni_install.conflist import PLUGIN_TYPE, Change, PluginSettings
from node_agent.cni_install.dirwatch import DirWatch
from weir_common.atomic_file import TEMP_SUFFIX, fsync_directory, write_atomically
from weir_common.errors import InvalidInputError, NodeSetupError, TransientError, WeirError

log = logging.getLogger(__name__)

BUNDLE_STORE: Final = f".{PLUGIN_TYPE}"
_LOCK_TIMEOUT_S: Final = 10.0
_POLL_S: Final = 0.25
# The conf dir is re-read this often even without an inotify event.
RESYNC_S: Final = 30.0
# A config that does not parse is usually being written; look again this soon.
_RETRY_S: Final = 0.2


# -- the plugin binary -------------------------------------------------------


def install_plugin_binary(bundle: Path, bin_dir: Path) -> Path:
    """Copy the bundle into `bin_dir` and point `bin_dir/weir-cni` at it; idempotent."""
    executable = bundle / PLUGIN_TYPE
    if not executable.is_file() or not os.access(executable, os.X_OK):
        raise NodeSetupError(f"{executable} is not an executable weir-cni bundle")
    if not bin_dir.is_dir():
        raise NodeSetupError(f"CNI bin dir {bin_dir} does not exist")
    digest = _tree_digest(bundle)
    store = bin_dir / BUNDLE_STORE
    store.mkdir(mode=0o755, exist_ok=True)
    dest = store / digest
    if not dest.is_dir():
        tmp = store / f".{digest}.{os.getpid()}{TEMP_SUFFIX}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle, tmp, symlinks=True)
        tmp.rename(dest)
    link = bin_dir / PLUGIN_TYPE
    target = Path(BUNDLE_STORE) / digest / PLUGIN_TYPE
    if not (link.is_symlink() and link.readlink() == target):
        tmp_link = bin_dir / f".{PLUGIN_TYPE}.{os.getpid()}{TEMP_SUFFIX}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(target)
        tmp_link.rename(link)
        log.info("installed %s -> %s", link, target)
    for old in store.iterdir():
        if old.name != digest:
            shutil.rmtree(old, ignore_errors=True)
    return link


def remove_plugin_binary(bin_dir: Path) -> list[str]:
    """Remove the weir-cni link and bundles; anything else in `bin_dir` is left alone."""
    removed: list[str] = []
    link = bin_dir / PLUGIN_TYPE
    if link.is_symlink() and link.readlink().parts[:1] == (BUNDLE_STORE,):
        link.unlink()
        removed.append(str(link))
    store = bin_dir / BUNDLE_STORE
    if store.is_dir():
        shutil.rmtree(store)
        removed.append(str(store))
    return removed


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest.update(f"L {rel} {path.readlink()}\n".encode())
        elif path.is_file():
            executable = "x" if os.access(path, os.X_OK) else "-"
            digest.update(f"F {rel} {executable} {path.stat().st_size}\n".encode())
            with path.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


# -- the conf dir -----------------------------------------------------------


class ConfDirInstaller:
    """Keeps weir-cni in the runtime's primary network config in `conf_dir`."""

    def __init__(self, conf_dir: Path, settings: PluginSettings) -> None:
        self.conf_dir = conf_dir
        self.settings = settings

    def snapshot(self) -> dict[str, str]:
        """{name: text} of every file the runtime could read as a network config."""
        found: dict[str, str] = {}
        for path in self.conf_dir.iterdir():
            if conflist.is_config_name(path.name) and path.is_file():
                found[path.name] = path.read_text()
        return found

    def ensure_inserted(self) -> str | None:
        """Insert weir-cni if it is not in place; the change made, or None if there was none."""
        with self._locked():
            change = conflist.insert(self.snapshot(), self.settings)
            if change is None:
                return None
            self._apply(change)
        log.info("CNI config: %s", change.summary)
        return change.summary

    def remove(self) -> str | None:
        """Take weir-cni out of every config file; the change made, or None."""
        with self._locked():
            change = conflist.remove(self.snapshot())
            if change is None:
                return None
            self._apply(change)
        log.info("CNI config: %s", change.summary)
        return change.summary

    def wait_for_primary(self, timeout_s: float) -> str:
        """The primary config's name, waiting up to `timeout_s` for the primary CNI to write it."""
        deadline = time.monotonic() + timeout_s
        watch: DirWatch | None = None
        try:
            while True:
                if self.conf_dir.is_dir():
                    primary = conflist.primary_config(self.snapshot())
                    if primary is not None:
                        return primary
                    if watch is None:
                        with contextlib.suppress(FileNotFoundError):
                            watch = DirWatch(self.conf_dir)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeSetupError(
                        f"no CNI network config (*.conflist, *.conf, *.json) in {self.conf_dir} "
                        f"after {timeout_s:g} s: is the primary network plugin installed?"
                    )
                if watch is not None:
                    watch.wait(min(left, 1.0))
                else:
                    time.sleep(min(left, _POLL_S))
        finally:
            if watch is not None:
                watch.close()

    def install(self, timeout_s: float) -> str | None:
        """Wait for the primary config and insert weir-cni, retrying a half-written file."""
        deadline = time.monotonic() + timeout_s
        self.wait_for_primary(timeout_s)
        while True:
            try:
                return self.ensure_inserted()
            except InvalidInputError:
                if time.monotonic() + _RETRY_S >= deadline:
                    raise
            time.sleep(_RETRY_S)

    def watch(self, stop: threading.Event, resync_s: float = RESYNC_S) -> None:
        """Put weir-cni back whenever the config loses it, until `stop` is set.

        Errors (a config being written, a directory briefly gone) are logged
        and retried; the loop itself only ends on `stop`.
        """
        watch: DirWatch | None = None
        next_sync = 0.0
        try:
            while not stop.is_set():
                if watch is None or watch.gone:
                    if watch is not None:
                        watch.close()
                    watch = None
                    with contextlib.suppress(FileNotFoundError):
                        watch = DirWatch(self.conf_dir)
                    next_sync = 0.0  # the directory may have changed unseen
                changed = watch.wait(_POLL_S) if watch is not None else stop.wait(_POLL_S)
                if changed or time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self._sync_once(resync_s)
        finally:
            if watch is not None:
                watch.close()

    def _sync_once(self, resync_s: float) -> float:
        """One repair attempt; returns how long until the next one without events."""
        try:
            self.ensure_inserted()
        except (InvalidInputError, TransientError) as e:
            log.debug("CNI config not repairable yet: %s", e.message)
            return _RETRY_S
        except (WeirError, OSError) as e:
            log.warning("CNI config repair failed: %s", e)
            return _RETRY_S * 5
        return resync_s

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.conf_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TransientError(f"CNI conf dir {self.conf_dir} does not exist") from None
        try:
            deadline = time.monotonic() + _LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TransientError(
                            f"another installer has held {self.conf_dir} for {_LOCK_TIMEOUT_S:g} s"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def _apply(self, change: Change) -> None:
        for name, text in change.writes:
            like = self.conf_dir / name
            if not like.exists():
                # A .conf turned into a .conflist, or back: the mode and owner carry over.
                stem = like.stem
                like = next(
                    (self.conf_dir / d for d in change.deletes if Path(d).stem == stem), like
                )
            _write_like(self.conf_dir / name, text, like=like)
        for name in change.deletes:
            (self.conf_dir / name).unlink(missing_ok=True)
        fsync_directory(self.conf_dir)


def _write_like(path: Path, text: str, *, like: Path) -> None:
    """Replace `path` with the mode and owner of `like` (0644 root if absent)."""
    try:
        st = like.stat()
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o644, (0, 0)
    write_atomically(path, text.encode(), mode, owner=owner)
