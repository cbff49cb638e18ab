"""HPACK (RFC 7541): a full decoder for what peers send, a stateless encoder for what we send.

Decoding accepts every representation a peer may use: indexed fields (static
and dynamic table), literals with incremental indexing, without indexing and
never indexed, dynamic table size updates at the start of a block, plain and
Huffman-coded strings. Anything else raises HpackError, which the connection
turns into a COMPRESSION_ERROR (RFC 9113 section 4.3): the connection is dead
after one, so a block that fails half way may leave the dynamic table with
the entries added before the failure; nothing rolls them back, because
nothing decodes with that table again.

Limits, so a block costs at most what it weighs: integers above 2**32 or
longer than five continuation octets are refused (RFC 7541 5.1 lets an
implementation limit both), the dynamic table never grows past the size the
peer last signalled, which may never exceed what we advertised, and the
decoded list may not exceed max_header_list_size counted as RFC 9113 counts
it (name + value + 32 per field). That last one is an HpackError too: the rest
of the block is left undecoded, so the table is out of step with the peer's
and the connection has to go (RFC 9113 10.5.1 allows closing it rather than
answering 431). Checking names and values for HTTP (case, forbidden octets,
pseudo-headers) is the caller's job.

Encoding never touches the peer's dynamic table and never Huffman-codes: a
field that matches a static entry exactly is one octet, any other is a
literal without indexing, naming a static entry when one has the name. HBONE
sends a handful of fields per stream, so a table would save little and its
state would have to follow the peer's SETTINGS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from node_agent.proxy.http2 import huffman

# RFC 7541 Appendix A; index i is STATIC_TABLE[i - 1].
STATIC_TABLE: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)
_STATIC_LEN: Final = len(STATIC_TABLE)
_FIRST_DYNAMIC: Final = _STATIC_LEN + 1
# RFC 7541 4.1: an entry's size counts its name, its value and this overhead.
ENTRY_OVERHEAD: Final = 32
# RFC 9113 6.5.2: the table size in force before SETTINGS say otherwise.
DEFAULT_TABLE_SIZE: Final = 4096
_INTEGER_MAX: Final = 2**32
# Five 7-bit groups carry any value up to 2**32 above the smallest (4-bit) prefix;
# a sixth could only be padding or too large.
_CONTINUATIONS_MAX: Final = 5


class HpackError(Exception):
    """A header block that cannot be decoded (COMPRESSION_ERROR)."""


def _integer(data: bytes, pos: int, mask: int) -> tuple[int, int]:
    """The integer whose prefix is the low bits `mask` of data[pos], and the position after it."""
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    for _ in range(_CONTINUATIONS_MAX):
        if pos >= len(data):
            raise HpackError("integer runs past the end of the header block")
        octet = data[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if not octet & 0x80:
            if value > _INTEGER_MAX:
                raise HpackError(f"integer {value} exceeds 2**32")
            return value, pos
        shift += 7
    raise HpackError(f"integer longer than {_CONTINUATIONS_MAX} continuation octets")


def _string(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    """The string literal at data[pos] (RFC 7541 5.2), decoded, and the position after it."""
    if pos >= len(data):
        raise HpackError(f"header block ends before the {what}")
    first = data[pos]
    length = first & 0x7F
    if length == 0x7F:
        length, pos = _integer(data, pos, 0x7F)
    else:
        pos += 1
    end = pos + length
    if end > len(data):
        raise HpackError(
            f"{what} of {length} octets runs past the end of the header block"
            f" ({len(data) - pos} left)"
        )
    if not first & 0x80:
        return data[pos:end], end
    try:
        return huffman.decode(data[pos:end]), end
    except huffman.HuffmanError as e:
        raise HpackError(f"{what}: {e}") from e


def _check_size(size: int, what: str) -> int:
    if not 0 <= size <= _INTEGER_MAX:
        raise ValueError(f"{what} must be between 0 and 2**32, not {size}")
    return size


class Decoder:
    """One connection's header block decoder: its dynamic table lives as long as the connection.

    `max_table_size` is SETTINGS_HEADER_TABLE_SIZE as the peer knows it: the table
    starts at that size, and the peer may change it with size updates up to it. So
    construct a connection's decoder with the default, 4096, whatever our first
    SETTINGS say (a client sends its first request before it has read them), and set
    the attribute when the peer acknowledges a new value (RFC 9113 6.5.3), not when
    sending it. Lowering it below the table's current size obliges the peer to begin
    its next block with a size update that fits (RFC 7541 4.2); a block without one
    is an error. Raising it lets the peer grow the table with a size update.
    """

    def __init__(
        self,
        max_table_size: int = DEFAULT_TABLE_SIZE,
        max_header_list_size: int = 65536,
    ) -> None:
        self._max_table_size = _check_size(max_table_size, "max_table_size")
        self.max_header_list_size = _check_size(max_header_list_size, "max_header_list_size")
        # The whole index space in one list, so a lookup is one bounds check and one
        # subscript: [0] is never read (index 0 is an error), then the static table,
        # then the dynamic one newest first, from index 62. Insertion shifts at most
        # max_table_size / 32 entries, in C.
        self._fields: list[tuple[bytes, bytes]] = [(b"", b""), *STATIC_TABLE]
        self._size = 0
        self._limit = max_table_size
        self._update_due = False

    @property
    def max_table_size(self) -> int:
        return self._max_table_size

    @max_table_size.setter
    def max_table_size(self, size: int) -> None:
        self._max_table_size = _check_size(size, "max_table_size")
        if size < self._limit:
            self._update_due = True

    @property
    def table(self) -> tuple[tuple[bytes, bytes], ...]:
        """The dynamic table's entries, newest (index 62) first."""
        return tuple(self._fields[_FIRST_DYNAMIC:])

    @property
    def table_size(self) -> int:
        """The dynamic table's size in octets as RFC 7541 4.1 counts it."""
        return self._size

    @property
    def table_limit(self) -> int:
        """The dynamic table's maximum size, as the peer last set it."""
        return self._limit

    def decode(self, block: bytes | memoryview) -> list[tuple[bytes, bytes]]:  # noqa: PLR0912
        """The header list a complete header block (HEADERS plus CONTINUATIONs) encodes."""
        # One flat loop over the representations: a call per field would cost more than
        # decoding most fields does.
        data = block if isinstance(block, bytes) else bytes(block)
        end = len(data)
        pos = 0
        if (end and data[0] & 0xE0 == 0x20) or self._update_due:
            pos = self._size_updates(data)
        fields = self._fields
        headers: list[tuple[bytes, bytes]] = []
        list_size = 0
        list_limit = self.max_header_list_size
        while pos < end:
            first = data[pos]
            if first & 0x80:
                index = first & 0x7F
                if index == 0x7F:
                    index, pos = _integer(data, pos, 0x7F)
                else:
                    pos += 1
                if not 0 < index < len(fields):
                    raise self._bad_index(index)
                field = fields[index]
            else:
                if first & 0x40:
                    mask = 0x3F
                elif first & 0x20:
                    raise HpackError("dynamic table size update after the first header field")
                else:
                    # Without indexing (0000) and never indexed (0001) decode alike;
                    # we never re-encode what we receive, so "never" needs no memory.
                    mask = 0x0F
                index = first & mask
                if index == mask:
                    index, pos = _integer(data, pos, mask)
                else:
                    pos += 1
                if not index:
                    name, pos = _string(data, pos, "header name")
                elif index < len(fields):
                    name = fields[index][0]
                else:
                    raise self._bad_index(index)
                value, pos = _string(data, pos, "header value")
                field = (name, value)
                if mask == 0x3F:
                    self._insert(field)
            list_size += len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if list_size > list_limit:
                raise HpackError(
                    f"header list larger than max_header_list_size {list_limit}"
                    f" after {len(headers) + 1} fields"
                )
            headers.append(field)
        return headers

    def _size_updates(self, data: bytes) -> int:
        """Apply the size updates a block begins with; the position of its first field."""
        pos = 0
        # RFC 7541 4.2: size updates come first in a block, and nowhere else.
        while pos < len(data) and data[pos] & 0xE0 == 0x20:
            size, pos = _integer(data, pos, 0x1F)
            if size > self._max_table_size:
                raise HpackError(
                    f"dynamic table size update to {size} exceeds the {self._max_table_size}"
                    " we advertised"
                )
            self._limit = size
            self._evict()
            self._update_due = False
        if self._update_due:
            raise HpackError(
                f"header block does not begin with the dynamic table size update that"
                f" SETTINGS_HEADER_TABLE_SIZE {self._max_table_size} requires"
            )
        return pos

    def _bad_index(self, index: int) -> HpackError:
        if index == 0:
            return HpackError("table index 0")
        return HpackError(
            f"table index {index} past the end of the table"
            f" ({_STATIC_LEN} static + {len(self._fields) - _FIRST_DYNAMIC} dynamic entries)"
        )

    def _insert(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        if size > self._limit:
            # RFC 7541 4.4: an entry larger than the table empties it and is not added.
            del self._fields[_FIRST_DYNAMIC:]
            self._size = 0
            return
        self._size += size
        self._fields.insert(_FIRST_DYNAMIC, field)
        if self._size > self._limit:
            self._evict()

    def _evict(self) -> None:
        fields = self._fields
        while self._size > self._limit:
            name, value = fields.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD


def _encode_integer(value: int, mask: int, flags: int) -> bytes:
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


# What encode() writes for a field in the static table, and the literal's first
# octets for a name in it (its lowest index, without indexing: 0000 + 4-bit prefix).
_STATIC_FIELDS: Final = {
    field: _encode_integer(index, 0x7F, 0x80) for index, field in enumerate(STATIC_TABLE, 1)
}
_STATIC_NAMES: Final = {
    name: _encode_integer(index, 0x0F, 0x00)
    for index, (name, _) in reversed(list(enumerate(STATIC_TABLE, 1)))
}
_SHORT_LENGTHS: Final = tuple(bytes((n,)) for n in range(0x7F))


def _length(value: int) -> bytes:
    return _SHORT_LENGTHS[value] if value < 0x7F else _encode_integer(value, 0x7F, 0x00)


def encode(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A header block for `headers`, decodable by any HPACK decoder whatever its table."""
    out = bytearray()
    for field in headers:
        indexed = _STATIC_FIELDS.get(field)
        if indexed is not None:
            out += indexed
            continue
        name, value = field
        prefix = _STATIC_NAMES.get(name)
        if prefix is None:
            out.append(0x00)
            out += _length(len(name))
            out += name
        else:
            out += prefix
        out += _length(len(value))
        out += value
    return bytes(out)


def size_update(size: int) -> bytes:
    """A dynamic table size update, to begin a block with (RFC 7541 6.3).

    encode() never adds to the peer's table, but a peer that sends a smaller
    SETTINGS_HEADER_TABLE_SIZE than the one in force still expects the next block
    to begin by confirming a size within it (RFC 7541 4.2), and nghttp2 (Envoy),
    in the versions whose source we read, expects one after any such setting at
    all. size_update(0) fits every setting: put it before the encode() output of
    the first block after each SETTINGS carrying SETTINGS_HEADER_TABLE_SIZE.
    """
    return _encode_integer(_check_size(size, "table size"), 0x1F, 0x20)
