"""Types of the C module _fastpath.c (see its header for what it does and why)."""

from typing import final

@final
class StreamState:
    # The codec's (connection.py): flow control each way, and which sides are closed.
    send_window: int
    recv_available: int  # what the peer may still send
    recv_unacked: int  # taken, not yet handed back in a WINDOW_UPDATE
    local: bool  # we opened it
    local_closed: bool
    remote_closed: bool
    responded: bool  # a stream of ours got its final response
    # HBONE's (hbone.py): where DATA goes without Python once the TCP side is attached.
    peer: object | None  # the TcpPeer
    flow: object | None  # the Flow its bytes are counted into
    count_down: bool  # received bytes count as flow.down (sent ones as flow.up)
    peer_congested: bool  # the TCP side's write buffer is full: acks are held
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
