"""HPACK: RFC 7541 Appendix C, both directions against the `hpack` package, every refusal."""

from __future__ import annotations

import random
import re

import hpack as reference
import pytest
from hpack import NeverIndexedHeaderTuple
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

from node_agent.proxy.http2 import huffman
from node_agent.proxy.http2.hpack import (
    STATIC_TABLE,
    Decoder,
    HpackError,
    encode,
    size_update,
)

HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)

Headers = list[tuple[bytes, bytes]]


def _h(text: str) -> bytes:
    return bytes.fromhex(text)


# -- RFC 7541 Appendix C ----------------------------------------------------------

# (block, decoded list, dynamic table newest first, table size) per step.
Step = tuple[bytes, Headers, Headers, int]

_C2: list[tuple[str, Step]] = [
    (
        "C.2.1 literal with indexing",
        (
            _h("400a637573746f6d2d6b65790d637573746f6d2d686561646572"),
            [(b"custom-key", b"custom-header")],
            [(b"custom-key", b"custom-header")],
            55,
        ),
    ),
    (
        "C.2.2 literal without indexing",
        (_h("040c2f73616d706c652f70617468"), [(b":path", b"/sample/path")], [], 0),
    ),
    (
        "C.2.3 literal never indexed",
        (_h("100870617373776f726406736563726574"), [(b"password", b"secret")], [], 0),
    ),
    ("C.2.4 indexed field", (_h("82"), [(b":method", b"GET")], [], 0)),
]

_AUTHORITY = (b":authority", b"www.example.com")
_NO_CACHE = (b"cache-control", b"no-cache")
_CUSTOM = (b"custom-key", b"custom-value")
_REQUESTS: list[tuple[Headers, Headers, int]] = [
    (
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), _AUTHORITY],
        [_AUTHORITY],
        57,
    ),
    (
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), _AUTHORITY, _NO_CACHE],
        [_NO_CACHE, _AUTHORITY],
        110,
    ),
    (
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/index.html"),
            _AUTHORITY,
            _CUSTOM,
        ],
        [_CUSTOM, _NO_CACHE, _AUTHORITY],
        164,
    ),
]
_C3 = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
_C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]

_DATE1 = (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT")
_DATE2 = (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT")
_LOCATION = (b"location", b"https://www.example.com")
_PRIVATE = (b"cache-control", b"private")
_COOKIE = (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
_GZIP = (b"content-encoding", b"gzip")
_RESPONSES: list[tuple[Headers, Headers, int]] = [
    (
        [(b":status", b"302"), _PRIVATE, _DATE1, _LOCATION],
        [_LOCATION, _DATE1, _PRIVATE, (b":status", b"302")],
        222,
    ),
    (
        [(b":status", b"307"), _PRIVATE, _DATE1, _LOCATION],
        [(b":status", b"307"), _LOCATION, _DATE1, _PRIVATE],
        222,
    ),
    (
        [(b":status", b"200"), _PRIVATE, _DATE2, _LOCATION, _GZIP, _COOKIE],
        [_COOKIE, _GZIP, _DATE2],
        215,
    ),
]
_C5 = [
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a"
    "323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69"
    "707738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61"
    "782d6167653d333630303b2076657273696f6e3d31",
]
_C6 = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad"
    "171863c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2"
    "e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


def _steps(blocks: list[str], expected: list[tuple[Headers, Headers, int]]) -> list[Step]:
    return [(_h(b), *e) for b, e in zip(blocks, expected, strict=True)]


@pytest.mark.parametrize(("name", "step"), _C2, ids=[n for n, _ in _C2])
def test_rfc7541_c2_single_representations(name, step):
    _check_sequence(Decoder(), [step])


@pytest.mark.parametrize(
    ("steps", "table_size"),
    [
        pytest.param(_steps(_C3, _REQUESTS), 4096, id="C.3 requests"),
        pytest.param(_steps(_C4, _REQUESTS), 4096, id="C.4 requests, Huffman"),
        pytest.param(_steps(_C5, _RESPONSES), 256, id="C.5 responses, evictions"),
        pytest.param(_steps(_C6, _RESPONSES), 256, id="C.6 responses, Huffman, evictions"),
    ],
)
def test_rfc7541_sequences_on_one_connection(steps, table_size):
    _check_sequence(Decoder(max_table_size=table_size), steps)


def _check_sequence(decoder: Decoder, steps: list[Step]) -> None:
    for block, headers, table, size in steps:
        assert decoder.decode(block) == headers
        assert list(decoder.table) == table
        assert decoder.table_size == size


def test_memoryview_blocks_decode_like_bytes():
    from_views, from_bytes = Decoder(), Decoder()
    for block in _C4:
        view = memoryview(b"padding" + _h(block))[7:]
        assert from_views.decode(view) == from_bytes.decode(_h(block))
    assert from_views.table == from_bytes.table
    assert list(from_views.table) == _REQUESTS[-1][1]


# -- Huffman ------------------------------------------------------------------------


def test_huffman_table_is_rfc7541_appendix_b():
    # The hpack package's copy of the same appendix, typed in independently of ours.
    assert tuple(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True)) == huffman.CODES


def test_huffman_decodes_every_octet_after_every_prefix():
    # All 256 symbols in 256 rotations behind 256 different first symbols: each
    # symbol lands at many bit offsets, across octet boundaries, after many others.
    every = bytes(range(256))
    for first in range(256):
        text = bytes([first]) + every[first:] + every[:first]
        assert huffman.decode(HUFFMAN.encode(text)) == text


def test_huffman_random_strings_match_the_reference_encoder():
    rng = random.Random(7541)
    for _ in range(2000):
        text = rng.randbytes(rng.randrange(0, 64))
        assert huffman.decode(HUFFMAN.encode(text)) == text


def test_huffman_padding_of_up_to_seven_ones_is_accepted():
    # 'a' is 00011: the 3 padding bits are the 3 high bits of EOS.
    assert huffman.decode(b"\x1f") == b"a"
    # '0' is 00000 and 'a' 00011, then 6 bits of padding.
    assert huffman.decode(bytes([0b00000000, 0b11111111])) == b"0a"
    assert huffman.decode(b"") == b""


@pytest.mark.parametrize(
    ("coded", "message"),
    [
        (b"\xff", "Huffman padding longer than 7 bits"),
        (b"\x1f\xff", "Huffman padding longer than 7 bits"),
        (b"\x18", "Huffman padding is not a prefix of EOS (all ones)"),
        (b"\x1e", "Huffman padding is not a prefix of EOS (all ones)"),
        # 'a' (5 bits), then 35 ones: the 30 of EOS and 5 more.
        (bytes([0b00011111, 0xFF, 0xFF, 0xFF, 0xFF]), "Huffman string contains EOS"),
        (b"\xff\xff\xff\xff", "Huffman string contains EOS"),
        # An incomplete 28-bit code: 24 bits in, longer than any padding.
        (b"\xff\xff\xfe", "Huffman padding longer than 7 bits"),
    ],
)
def test_huffman_refusals(coded, message):
    with pytest.raises(huffman.HuffmanError, match=f"^{re.escape(message)}$"):
        huffman.decode(coded)


def test_huffman_strings_in_a_block():
    decoder = Decoder()
    coded = HUFFMAN.encode(b"abcd")
    block = b"\x04\x80" + b"\x00\x81\x1f" + bytes([0x80 | len(coded)]) + coded
    assert decoder.decode(block) == [(b":path", b""), (b"a", b"abcd")]


# -- the dynamic table ------------------------------------------------------------


def _literal(name: bytes, value: bytes, *, first: int = 0x40) -> bytes:
    return bytes([first, len(name)]) + name + bytes([len(value)]) + value


def test_entry_larger_than_the_table_empties_it():
    decoder = Decoder(max_table_size=100)
    decoder.decode(_literal(b"a", b"b"))
    assert decoder.table_size == 34
    decoder.decode(_literal(b"big", b"x" * 70))
    assert decoder.table == ()
    assert decoder.table_size == 0


def test_entry_that_fits_exactly_evicts_all_others():
    decoder = Decoder(max_table_size=100)
    decoder.decode(_literal(b"a", b"b") + _literal(b"c", b"d"))
    assert decoder.table == ((b"c", b"d"), (b"a", b"b"))
    decoder.decode(_literal(b"e", b"x" * 67))
    assert decoder.table == ((b"e", b"x" * 67),)
    assert decoder.table_size == 100


def test_literal_may_name_the_entry_its_insertion_evicts():
    # RFC 7541 4.4: the name is read before the oldest entry goes.
    decoder = Decoder(max_table_size=40)
    decoder.decode(_literal(b"name", b"v"))
    assert decoder.decode(b"\x7e\x01w") == [(b"name", b"w")]
    assert decoder.table == ((b"name", b"w"),)


def test_indexed_dynamic_entries_count_from_the_newest():
    decoder = Decoder()
    decoder.decode(_literal(b"old", b"1") + _literal(b"new", b"2"))
    assert decoder.decode(b"\xbe\xbf") == [(b"new", b"2"), (b"old", b"1")]
    # Literal without indexing, naming dynamic entry 63.
    assert decoder.decode(b"\x0f\x30\x01x") == [(b"old", b"x")]


def test_size_updates_at_the_start_evict_and_may_be_repeated():
    decoder = Decoder()
    decoder.decode(_literal(b"a", b"b") + _literal(b"c", b"d"))
    assert decoder.decode(b"\x3f\x04") == []  # 35: room for one entry
    assert decoder.table == ((b"c", b"d"),)
    assert decoder.table_limit == 35
    assert decoder.decode(b"\x20\x3f\xe1\x1f\x82") == [(b":method", b"GET")]
    assert decoder.table == ()
    assert decoder.table_limit == 4096


def test_lowering_the_advertised_size_requires_an_update_next():
    decoder = Decoder()
    decoder.decode(_literal(b"a", b"b"))
    decoder.max_table_size = 0
    with pytest.raises(HpackError, match="does not begin with the dynamic table size update"):
        decoder.decode(b"\x82")
    decoder = Decoder()
    decoder.max_table_size = 0
    assert decoder.decode(b"\x20\x82") == [(b":method", b"GET")]
    assert decoder.decode(b"\x82") == [(b":method", b"GET")]
    assert decoder.table_limit == 0


def test_raising_the_advertised_size_allows_larger_updates_only():
    decoder = Decoder()
    with pytest.raises(HpackError, match="update to 8192 exceeds the 4096 we advertised"):
        decoder.decode(b"\x3f\xe1\x3f")
    decoder = Decoder()
    decoder.max_table_size = 8192
    assert decoder.decode(b"\x3f\xe1\x3f") == []
    assert decoder.table_limit == 8192
    assert decoder.decode(b"\x82") == [(b":method", b"GET")]


@pytest.mark.parametrize("size", [-1, 2**32 + 1])
def test_impossible_sizes_are_refused(size):
    with pytest.raises(ValueError, match="max_table_size must be between 0 and 2\\*\\*32"):
        Decoder(max_table_size=size)
    with pytest.raises(ValueError, match="max_header_list_size must be between"):
        Decoder(max_header_list_size=size)
    decoder = Decoder()
    with pytest.raises(ValueError, match="max_table_size must be between"):
        decoder.max_table_size = size
    assert decoder.max_table_size == 4096
    with pytest.raises(ValueError, match="table size must be between"):
        size_update(size)


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"\x80", "table index 0$"),
        (b"\xbe", r"table index 62 past the end of the table \(61 static \+ 0 dynamic entries\)"),
        (b"\x7e\x01x", "table index 62 past the end"),
        (b"\x0f\x2f\x01x", "table index 62 past the end"),
        (b"\xff", "integer runs past the end of the header block"),
        (b"\xff\x80", "integer runs past the end of the header block"),
        (b"\xff\xff\xff\xff\xff\x0f", "integer 4294967422 exceeds 2\\*\\*32"),
        (b"\xff\x80\x80\x80\x80\x80\x00", "integer longer than 5 continuation octets"),
        (b"\x00", "header block ends before the header name"),
        (b"\x04", "header block ends before the header value"),
        (b"\x40\x01a", "header block ends before the header value"),
        (b"\x04\x05ab", r"header value of 5 octets runs past the end of the header block \(2 left"),
        (b"\x00\x7f\x80\x01a", "header name of 255 octets runs past the end"),
        (b"\x04\x7f\xff\xff\xff\xff\x0f", "integer 4294967422 exceeds 2\\*\\*32"),
        (b"\x04\x81\xff", "header value: Huffman padding longer than 7 bits"),
        (b"\x00\x81\x18\x00", "header name: Huffman padding is not a prefix of EOS"),
        (b"\x04\x84\xff\xff\xff\xff", "header value: Huffman string contains EOS"),
        (b"\x82\x20", "dynamic table size update after the first header field"),
        (b"\x3f\xe2\x1f", "update to 4097 exceeds the 4096 we advertised"),
        (b"\x3f\xff\xff\xff\xff\x0f", "integer 4294967326 exceeds 2\\*\\*32"),
    ],
)
def test_refusals(block, message):
    with pytest.raises(HpackError, match=message):
        Decoder().decode(block)


def test_integer_of_exactly_2_to_the_32_is_read():
    # 127 + (2**32 - 127): read, then refused as an index, not as an integer.
    rest = 2**32 - 127
    continuation = bytearray()
    while rest >= 0x80:
        continuation.append(0x80 | (rest & 0x7F))
        rest >>= 7
    continuation.append(rest)
    with pytest.raises(HpackError, match="table index 4294967296 past the end"):
        Decoder().decode(b"\xff" + bytes(continuation))


def test_header_list_over_the_limit_is_refused():
    # Two fields of 1 + 7 + 32 = 40 each.
    block = _literal(b"a", b"1234567", first=0) * 2
    assert len(Decoder(max_header_list_size=80).decode(block)) == 2
    with pytest.raises(HpackError, match="larger than max_header_list_size 79 after 2 fields"):
        Decoder(max_header_list_size=79).decode(block)


def test_indexed_repetition_is_bounded_by_the_list_limit():
    decoder = Decoder()
    # Literal with indexing, name and value as encode() writes them without.
    decoder.decode(b"\x40" + encode([(b"k", b"v" * 3000)])[1:])
    with pytest.raises(HpackError, match="larger than max_header_list_size 65536 after 22 fields"):
        decoder.decode(b"\xbe" * 1000)


def test_empty_block_is_an_empty_list():
    assert Decoder().decode(b"") == []


# -- encoding ----------------------------------------------------------------------


def test_encode_uses_static_fields_names_and_literals():
    block = encode(
        [
            (b":status", b"200"),
            (b":method", b"CONNECT"),
            (b":authority", b"10.1.2.3:8080"),
            (b"www-authenticate", b"x"),
            (b"baggage", b"k=v"),
        ]
    )
    assert block == (
        b"\x88"
        + b"\x02\x07CONNECT"
        + b"\x01\x0d10.1.2.3:8080"
        + b"\x0f\x2e\x01x"
        + b"\x00\x07baggage\x03k=v"
    )


def test_encode_long_strings_use_multi_octet_lengths():
    value = b"v" * 300
    block = encode([(b"x-long", value)])
    # 300 = 127 (the full prefix) + 0x2d + (1 << 7): low group first, continuation bit set.
    assert block[:11] == b"\x00\x06x-long\x7f\xad\x01"
    assert Decoder().decode(block) == [(b"x-long", value)]


def test_encode_leaves_every_table_alone():
    headers = [(b":method", b"CONNECT"), (b"baggage", b"k=v"), (b":status", b"200")]
    theirs = reference.Decoder()
    assert theirs.decode(encode(headers), raw=True) == headers
    assert len(theirs.header_table.dynamic_entries) == 0
    ours = Decoder()
    assert ours.decode(encode(headers)) == headers
    assert ours.table == ()


def _random_headers(rng: random.Random, names: list[bytes], values: list[bytes]) -> Headers:
    headers = []
    for _ in range(rng.randrange(0, 12)):
        pick = rng.random()
        if pick < 0.3:
            headers.append(rng.choice(STATIC_TABLE))
        elif pick < 0.8:
            headers.append((rng.choice(names), rng.choice(values)))
        else:
            name = bytes(
                rng.choice(b"abcdefghijklmnopqrstuvwxyz-") for _ in range(rng.randrange(1, 20))
            )
            headers.append((name, rng.randbytes(rng.randrange(0, 200))))
    return headers


def _vocabulary(rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    names = [n for n, _ in STATIC_TABLE] + [b"baggage", b"traceparent", b"x-custom"]
    values = [b"", b"CONNECT", b"10.1.2.3:8080", b"200"] + [
        rng.randbytes(rng.randrange(1, 300)) for _ in range(20)
    ]
    return names, values


def test_round_trip_through_our_encoder_and_the_reference_decoder():
    rng = random.Random(15)
    names, values = _vocabulary(rng)
    theirs = reference.Decoder(max_header_list_size=2**20)
    for _ in range(500):
        headers = _random_headers(rng, names, values)
        block = encode(headers)
        assert Decoder(max_header_list_size=2**20).decode(block) == headers
        assert theirs.decode(block, raw=True) == headers


@pytest.mark.parametrize("encoder_table_size", [4096, 256, 0])
def test_reference_encoder_blocks_decode_identically(encoder_table_size):
    """The reference encoder, with Huffman, its dynamic table and never-indexed fields."""
    rng = random.Random(encoder_table_size)
    names, values = _vocabulary(rng)
    theirs = reference.Encoder()
    theirs.header_table_size = encoder_table_size
    ours = Decoder(max_header_list_size=2**20)
    for round_ in range(600):
        headers = _random_headers(rng, names, values)
        fields = [
            NeverIndexedHeaderTuple(n, v) if rng.random() < 0.1 else (n, v) for n, v in headers
        ]
        if round_ % 97 == 96:
            # A size change mid-connection: the next block begins with the update.
            theirs.header_table_size = rng.choice([0, 100, 1000, 4096])
        block = theirs.encode(fields, huffman=rng.random() < 0.8)
        assert ours.decode(block) == headers
        mirror = theirs.header_table
        assert list(ours.table) == list(mirror.dynamic_entries)
        assert ours.table_size == mirror._current_size
    assert ours.table_limit == theirs.header_table_size


def test_size_update_encoding():
    assert size_update(0) == b"\x20"
    assert size_update(4096) == b"\x3f\xe1\x1f"
    decoder = Decoder()
    assert decoder.decode(size_update(100) + encode([(b":status", b"200")])) == [
        (b":status", b"200")
    ]
    assert decoder.table_limit == 100


def test_static_table_is_rfc7541_appendix_a():
    assert STATIC_TABLE == HeaderTable.STATIC_TABLE
