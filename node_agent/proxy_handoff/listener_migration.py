"""Let a pod's listening sockets hand their queued connections to a successor.

During a proxy upgrade both proxies listen on the same ports in each pod
netns (SO_REUSEPORT). When the old one closes its listeners, the kernel
by default resets the connections still in their accept queues and the
handshakes still in progress. With net.ipv4.tcp_migrate_req (Linux 5.14)
it moves them to another listener of the same reuseport group instead:
the successor. The sysctl is per network namespace, so the agent sets it in
each pod's before handing the pod to any proxy.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Final

from node_agent.netns import Netns, entered
from weir_common.errors import WeirError

log = logging.getLogger(__name__)

SYSCTL: Final = "net/ipv4/tcp_migrate_req"


# Which namespace /proc/sys/net shows is decided by the opening thread's netns.
# In a container /proc/sys is mounted read-only; the host's /proc is not. The
# agent runs with hostPID and SYS_PTRACE, so it reaches the host's through the
# root of a process in the host's mount namespace: its parent (the runtime's
# shim), or PID 1 (where a sandbox forbids that, the shim still answers).
def proc_sys_roots() -> tuple[Path, ...]:
    return (
        Path("/proc/sys"),
        Path(f"/proc/{os.getppid()}/root/proc/sys"),
        Path("/proc/1/root/proc/sys"),
    )


class ListenerMigration:
    """Turns the sysctl on in pod netns; says so once if this node cannot."""

    def __init__(self, roots: tuple[Path, ...] | None = None) -> None:
        self._roots = proc_sys_roots() if roots is None else roots
        self._warned = False

    def enable(self, netns: Netns) -> bool:
        """True once the pod's listeners will migrate; never raises for a node that cannot."""
        last: OSError | None = None
        try:
            with entered(netns):
                for root in self._roots:
                    try:
                        (root / SYSCTL).write_text("1\n")
                    except OSError as e:
                        last = e
                        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
                            break
                    else:
                        return True
        except (OSError, WeirError) as e:
            # The pod's netns is gone: handing it over fails on its own, saying so.
            log.debug("cannot enter %s to set %s: %s", netns.path, SYSCTL, e)
            return False
        if not self._warned:
            self._warned = True
            log.warning(
                "cannot set %s in pod netns (%s): a proxy upgrade will reset the "
                "connections queued on the old proxy's listeners",
                SYSCTL.replace("/", "."),
                last,
            )
        return False
