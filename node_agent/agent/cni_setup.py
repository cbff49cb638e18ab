"""The agent keeps weir-cni installed on its node, and says when it is.

At start: copy the plugin bundle to the CNI bin dir, wait for the primary
network config (the primary CNI may start after us), insert weir-cni last,
then watch the directory and put the entry back whenever the primary CNI
rewrites its file. Readiness stays false until the first insert succeeded:
a node whose pods would start without Weir in their chain is not ready.
The agent does not uninstall on exit: a restart or an upgrade must not let
pods start uncaptured. Only an uninstall the agent has positive evidence of
(node_agent/kubernetes/uninstall.py) calls `uninstall`, after `stop`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from node_agent.cni_install.conflist import PluginSettings
from node_agent.cni_install.installer import (
    ConfDirInstaller,
    install_plugin_binary,
    remove_plugin_binary,
)
from weir_common.errors import WeirError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CniSetupSettings:
    conf_dir: Path
    bin_dir: Path
    bundle: Path
    plugin: PluginSettings
    # How long one wait for the primary config lasts before it is logged and retried.
    wait_s: float = 60.0


class CniSetup:
    def __init__(self, settings: CniSetupSettings) -> None:
        self.settings = settings
        self._installer = ConfDirInstaller(settings.conf_dir, settings.plugin)
        self._installed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cni-setup", daemon=True)
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def uninstall(self) -> list[str]:
        """Take weir-cni out of the conf dir, then its binary out of the bin dir; what was done."""
        if self._thread.is_alive():
            # Still in a wait for the primary config: it may insert weir-cni after this.
            log.warning("uninstalling weir-cni while its installer has not stopped")
        done = []
        change = self._installer.remove()
        if change is not None:
            done.append(f"CNI config: {change}")
        done += [f"{path} removed" for path in remove_plugin_binary(self.settings.bin_dir)]
        return done

    def not_ready(self) -> str | None:
        if self._installed.is_set():
            return None
        return f"weir-cni not installed in {self.settings.conf_dir} yet" + (
            f": {self.last_error}" if self.last_error else ""
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                install_plugin_binary(self.settings.bundle, self.settings.bin_dir)
                change = self._installer.install(self.settings.wait_s)
            except WeirError as e:
                self.last_error = e.message
                log.warning("installing weir-cni: %s (retrying)", e.message)
                self._stop.wait(1.0)
                continue
            log.info(
                "weir-cni installed in %s: %s", self.settings.conf_dir, change or "already in place"
            )
            self.last_error = ""
            self._installed.set()
            self._installer.watch(self._stop)
            return
