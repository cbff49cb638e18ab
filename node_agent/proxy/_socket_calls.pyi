"""Types of the C module _socket_calls.c (see its header for what it does and why)."""

import socket
from typing import Protocol, TypeVar, overload

_S = TypeVar("_S", bound=socket.socket)

class _HasFileno(Protocol):
    def fileno(self) -> int: ...

def original_destination_v4(sock: int | _HasFileno, /) -> tuple[str, int]: ...
@overload
def socket_in_netns(netns_fd: int, home_fd: int, family: int, mark: int, /) -> socket.socket: ...
@overload
def socket_in_netns(
    netns_fd: int, home_fd: int, family: int, mark: int, cls: type[_S], /
) -> _S: ...
