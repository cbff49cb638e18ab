"""Byte pieces on their way to a socket: small ones joined, large ones left as they are.

Joining frames costs a copy of everything joined; writing them apart costs
a TLS record and a call each. Small pieces (frame headers, window updates,
a 1 KiB request) are cheap to copy and expensive to write alone; a 256 KiB
payload is the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

Bytes = bytes | bytearray | memoryview

# From this size on a piece is written on its own rather than copied into its neighbours.
LARGE: Final = 16 * 1024


def join_small_runs(pieces: Iterable[Bytes]) -> list[Bytes]:
    """`pieces` in order, each run of pieces under LARGE joined into one."""
    joined: list[Bytes] = []
    small: list[Bytes] = []
    for piece in pieces:
        if len(piece) < LARGE:
            small.append(piece)
            continue
        if small:
            joined.append(small[0] if len(small) == 1 else b"".join(small))
            small = []
        joined.append(piece)
    if small:
        joined.append(small[0] if len(small) == 1 else b"".join(small))
    return joined
