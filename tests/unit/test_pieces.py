"""Pieces on their way to a socket: small runs joined, large pieces left alone."""

from __future__ import annotations

from node_agent.proxy.pieces import LARGE, join_small_runs


def test_small_runs_are_joined_and_large_pieces_are_the_same_objects() -> None:
    big = bytes(LARGE)
    other = memoryview(bytearray(LARGE * 2))
    pieces = [b"a", b"bc", big, b"d", other, b"e", b"f"]

    joined = join_small_runs(pieces)

    assert [bytes(p) for p in joined] == [b"abc", big, b"d", bytes(other), b"ef"]
    assert joined[1] is big and joined[3] is other  # not copied
    assert b"".join(joined) == b"".join(pieces)


def test_a_lone_small_piece_is_not_copied_and_nothing_gives_nothing() -> None:
    small = b"x" * (LARGE - 1)
    assert join_small_runs([small])[0] is small
    assert join_small_runs([]) == []
