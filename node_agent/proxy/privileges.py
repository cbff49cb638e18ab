"""Run as the proxy user (UID/GID 1337) keeping only the two capabilities it needs.

The proxy must enter pod netns (setns: CAP_SYS_ADMIN) and mark its sockets
(SO_MARK: CAP_NET_ADMIN), yet run as 1337 so capture exempts its traffic.
Kubernetes gives a non-root container no ambient capabilities, so the
entrypoint starts as root and calls `drop_to` first thing:

1. every other capability leaves the bounding set (no way back, even via exec);
2. PR_SET_KEEPCAPS keeps the permitted set across setuid;
3. groups, GID, UID switch to the proxy's;
4. the two capabilities are made effective, inheritable and ambient, so they
   survive an exec as well (a re-exec'd interpreter keeps them).

The same result as util-linux `setpriv --reuid 1337 --regid 1337
--clear-groups --inh-caps -all,+sys_admin,+net_admin --ambient-caps
+sys_admin,+net_admin --bounding-set -all,+sys_admin,+net_admin`.
"""

from __future__ import annotations

import os
from typing import Final

from node_agent import libc
from weir_common.errors import NodeSetupError

CAP_NET_ADMIN: Final = 12
CAP_SYS_ADMIN: Final = 21
KEPT_CAPABILITIES: Final = (CAP_NET_ADMIN, CAP_SYS_ADMIN)

_PR_SET_KEEPCAPS: Final = 8
_PR_CAPBSET_DROP: Final = 24
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_RAISE: Final = 2
_CAP_LAST_CAP_FILE: Final = "/proc/sys/kernel/cap_last_cap"


def _prctl(what: str, option: int, arg2: int, arg3: int = 0) -> None:
    try:
        libc.prctl(option, arg2, arg3)
    except OSError as e:
        raise NodeSetupError(f"prctl({what}): {e.strerror}") from None


def drop_to(uid: int, gid: int) -> None:
    """Become `uid`/`gid` keeping CAP_SYS_ADMIN and CAP_NET_ADMIN (also across exec).

    Must be called as root, before any thread is started (capabilities and
    UIDs are per thread; Python's os.setuid covers every thread, capset does not).
    """
    if os.geteuid() != 0:
        raise NodeSetupError("dropping to the proxy user needs root to start with")
    with open(_CAP_LAST_CAP_FILE) as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        if cap not in KEPT_CAPABILITIES:
            _prctl(f"drop capability {cap} from the bounding set", _PR_CAPBSET_DROP, cap)
    _prctl("keep capabilities across setuid", _PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    mask = sum(1 << cap for cap in KEPT_CAPABILITIES)
    try:
        libc.capset(mask, mask, mask)
    except OSError as e:
        raise NodeSetupError(f"capset: {e.strerror}") from None
    for cap in KEPT_CAPABILITIES:
        _prctl(f"raise ambient capability {cap}", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap)


def ambient_capabilities() -> int:
    """This process's ambient capability mask, as /proc shows it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapAmb:"):
                return int(line.split()[1], 16)
    raise NodeSetupError("/proc/self/status has no CapAmb line")
