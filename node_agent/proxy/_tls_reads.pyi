"""Types of the C module _tls_reads.c (see its header for what it does and why)."""

def bind(
    ssl_read_ex: int,
    ssl_has_pending: int,
    ssl_get_error: int,
    err_get_error: int,
    err_clear_error: int,
    err_error_string_n: int,
    /,
) -> None: ...
def read_into(ssl: int, fd: int, buffer: memoryview, /) -> tuple[int, str | OSError]: ...
