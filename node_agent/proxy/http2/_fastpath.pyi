"""Types of the C module _fastpath.c (see its header for what it does and why)."""

from typing import final

@final
class StreamState:
    send_window: int
    recv_available: int
    recv_unacked: int
    local: bool
    local_closed: bool
    remote_closed: bool
    responded: bool
    peer: object | None
    flow: object | None
    count_down: bool
    peer_congested: bool
    held_acks: int
    def __init__(self, local: bool, send_window: int, recv_window: int) -> None: ...

@final
class DataSender:
    def __init__(
        self, state: StreamState, stream_id: int, peer: object, stream: object, protocol: object
    ) -> None: ...
    def __call__(self, data: bytes, /) -> None: ...

def deliver_data(
    data: bytes | memoryview,
    pos: int,
    streams: dict[int, StreamState],
    recv_available: int,
    recv_unacked: int,
    connection_threshold: int,
    stream_threshold: int,
    max_frame_size: int,
    out: list[bytes | bytearray | memoryview],
    /,
) -> tuple[int, int, int]: ...
