"""HPACK: header blocks in, a header list or HpackError out, and nothing else.

A connection's decoder sees a sequence of blocks sharing one dynamic table, so
every example is a short sequence fed to one decoder until the first refusal
(after which the connection would be gone). What is accepted must leave the
table within its limits, and must agree with the `hpack` package whenever
that accepts the same block too.
"""

from __future__ import annotations

import hpack as reference
from hypothesis import given
from hypothesis import strategies as st

from node_agent.proxy.http2 import huffman
from node_agent.proxy.http2.hpack import ENTRY_OVERHEAD, Decoder, HpackError
from tests.fuzz.fuzzing import budget, file_timeout, inputs, seeds

pytestmark = file_timeout()

BLOCKS = seeds("hpack")
LIST_LIMIT = 4096


def _decode_sequence(blocks: list[bytes], table_size: int) -> None:
    ours = Decoder(max_table_size=table_size, max_header_list_size=LIST_LIMIT)
    theirs = reference.Decoder(max_header_list_size=LIST_LIMIT)
    theirs.header_table_size = table_size
    theirs.max_allowed_table_size = table_size
    for block in blocks:
        try:
            headers = ours.decode(block)
        except HpackError:
            return
        sizes = [len(n) + len(v) + ENTRY_OVERHEAD for n, v in ours.table]
        assert ours.table_size == sum(sizes) <= ours.table_limit <= table_size
        assert sum(len(n) + len(v) + ENTRY_OVERHEAD for n, v in headers) <= LIST_LIMIT
        try:
            expected = theirs.decode(block, raw=True)
        except reference.HPACKError:
            return
        assert headers == [tuple(field) for field in expected]
        assert list(ours.table) == list(theirs.header_table.dynamic_entries)


@budget(400)
@given(
    st.lists(inputs(BLOCKS), min_size=1, max_size=4),
    st.sampled_from([0, 64, 256, 4096]),
)
def test_block_sequences_decode_or_are_refused(blocks: list[bytes], table_size: int) -> None:
    _decode_sequence(blocks, table_size)


@budget(400)
@given(st.binary(max_size=64))
def test_huffman_strings_decode_or_are_refused(coded: bytes) -> None:
    try:
        decoded = huffman.decode(coded)
    except huffman.HuffmanError:
        return
    # At least 5 bits per symbol, and fewer than 8 bits of padding.
    assert len(decoded) * 5 <= len(coded) * 8 < (len(decoded) * 30) + 8
