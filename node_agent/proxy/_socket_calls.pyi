"""Types of the C module _socket_calls.c (see its header for what it does and why)."""

import socket
from typing import Protocol

class _HasFileno(Protocol):
    def fileno(self) -> int: ...

def original_destination_v4(sock: int | _HasFileno, /) -> tuple[str, int]: ...
def socket_in_netns(netns_fd: int, home_fd: int, family: int, mark: int, /) -> socket.socket: ...
