"""HTTP/2 frame layout (RFC 9113 section 4, 6): codes and the frames this proxy writes.

Builders return the wire bytes of one frame. They are pure and checked by the
unit tests against the RFC's layouts and against an independent HTTP/2
implementation.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

HEADER: Final = struct.Struct(">BHBBL")  # 24-bit length as 8 + 16 bits, type, flags, stream
HEADER_SIZE: Final = 9
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAM_ID: Final = 2**31 - 1
MAX_WINDOW: Final = 2**31 - 1
DEFAULT_WINDOW: Final = 65_535
DEFAULT_MAX_FRAME_SIZE: Final = 16_384
LARGEST_FRAME_SIZE: Final = 2**24 - 1


class FrameType(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


# Flags, by the frame types that use them.
END_STREAM: Final = 0x1  # DATA, HEADERS
ACK: Final = 0x1  # SETTINGS, PING
END_HEADERS: Final = 0x4  # HEADERS, CONTINUATION
PADDED: Final = 0x8  # DATA, HEADERS
PRIORITY_FLAG: Final = 0x20  # HEADERS


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


_SETTING: Final = struct.Struct(">HL")
_U32: Final = struct.Struct(">L")
_TWO_U32: Final = struct.Struct(">LL")


def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    return HEADER.pack(length >> 16, length & 0xFFFF, frame_type, flags, stream_id)


def settings(values: dict[Setting, int]) -> bytes:
    payload = b"".join(_SETTING.pack(code, value) for code, value in values.items())
    return frame_header(len(payload), FrameType.SETTINGS, 0, 0) + payload


SETTINGS_ACK: Final = frame_header(0, FrameType.SETTINGS, ACK, 0)


def ping(opaque: bytes, *, ack: bool) -> bytes:
    return frame_header(8, FrameType.PING, ACK if ack else 0, 0) + opaque


def window_update(stream_id: int, increment: int) -> bytes:
    return frame_header(4, FrameType.WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame_header(4, FrameType.RST_STREAM, 0, stream_id) + _U32.pack(code)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return (
        frame_header(8 + len(debug), FrameType.GOAWAY, 0, 0)
        + _TWO_U32.pack(last_stream_id, code)
        + debug
    )


def headers(stream_id: int, block: bytes, *, end_stream: bool, max_frame_size: int) -> bytes:
    """HEADERS, with CONTINUATION frames if the block is larger than the peer takes at once."""
    first = block[:max_frame_size]
    rest = block[max_frame_size:]
    flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
    frames = [frame_header(len(first), FrameType.HEADERS, flags, stream_id), first]
    while rest:
        piece, rest = rest[:max_frame_size], rest[max_frame_size:]
        flags = 0 if rest else END_HEADERS
        frames += (frame_header(len(piece), FrameType.CONTINUATION, flags, stream_id), piece)
    return b"".join(frames)


def parse_u32(payload: bytes | memoryview) -> int:
    value: int = _U32.unpack_from(payload)[0]
    return value


def parse_two_u32(payload: bytes | memoryview) -> tuple[int, int]:
    first, second = _TWO_U32.unpack_from(payload)
    return first, second


def parse_settings(payload: bytes | memoryview) -> list[tuple[int, int]]:
    return [_SETTING.unpack_from(payload, offset) for offset in range(0, len(payload), 6)]
