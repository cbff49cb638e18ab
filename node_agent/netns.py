"""Where Weir enters network namespaces.

Everything else receives either a validated `Netns` or a socket/process made
here; the one exception is the proxy's upstream socket, made in C in one call
(node_agent/proxy/_socket_calls.c), with netns fds from `open_fd`. setns(2)
switches only the calling thread, so `entered()` is safe in a threaded
program as long as the block does not hop threads (no awaits inside).
A child process forked inside the block starts in the target namespace, which
is how commands such as iptables-restore are run in a pod without nsenter.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from node_agent import libc
from weir_common.errors import InvalidInputError, TransientError

_CLONE_NEWNET = 0x40000000
_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): which kind of namespace an nsfs fd is


@dataclass(frozen=True)
class Netns:
    """A network namespace known to exist when it was validated.

    `inode` identifies the namespace itself, whatever path it was reached by
    (/var/run/netns/X, /proc/PID/ns/net, a CNI runtime's bind mount).
    """

    path: Path
    inode: int

    @classmethod
    def validate(cls, path: str | Path) -> Netns:
        """Check that `path` is a network namespace other than our own.

        Capturing the namespace the agent itself runs in would redirect the
        agent's and the node's traffic into the proxy, so it is refused.
        """
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidInputError(f"network namespace {p} does not exist") from None
        except OSError as e:
            raise InvalidInputError(f"cannot open network namespace {p}: {e.strerror}") from None
        try:
            try:
                nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
            except OSError:
                raise InvalidInputError(f"{p} is not a namespace file") from None
            if nstype != _CLONE_NEWNET:
                raise InvalidInputError(f"{p} is a namespace, but not a network namespace")
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if inode == Path("/proc/thread-self/ns/net").stat().st_ino:
            raise InvalidInputError(
                f"{p} is the network namespace Weir itself runs in; refusing to capture it"
            )
        return cls(path=p, inode=inode)


def open_fd(netns: Netns) -> int:
    """An fd of `netns` (the caller closes it); TransientError if its path now names another.

    Paths are reused (a runtime's /run/netns/cni-* names, `ip netns add`): the
    inode check keeps a late operation from landing in a newer pod.
    """
    try:
        fd = os.open(netns.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TransientError(f"network namespace {netns.path} disappeared") from None
    if os.fstat(fd).st_ino != netns.inode:
        os.close(fd)
        raise TransientError(
            f"{netns.path} now names a different network namespace than when validated"
        )
    return fd


@contextlib.contextmanager
def entered(netns: Netns) -> Iterator[None]:
    """Run the block with the calling thread inside `netns`, then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = open_fd(netns)
        try:
            libc.setns(target, _CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _return(home, netns.path)
    finally:
        os.close(home)


def _return(home_fd: int, left: object) -> None:
    """Back into the thread's own netns; failing that would leave it in a pod: never go on."""
    try:
        libc.setns(home_fd, _CLONE_NEWNET)
    except OSError as e:  # pragma: no cover - kernel refused to take us back
        os.write(2, f"weir: fatal: cannot leave {left}: {e}\n".encode())
        os._exit(70)


def run(
    netns: Netns, argv: Sequence[str], stdin: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a command inside `netns` and capture its output (never raises on exit code)."""
    with entered(netns):
        try:
            return subprocess.run(
                list(argv),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            raise InvalidInputError(f"{argv[0]} is not installed") from None
