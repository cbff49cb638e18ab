"""Replacing a file so that a crash or a reader never sees it half written.

The data goes to a temporary file in the same directory (a rename is atomic
only within one filesystem), is fsynced, then renamed over the path; the
directory is fsynced last so that the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Final

# Temporary names end with this: no reader of a config directory (a CNI runtime
# looks at .conf, .conflist, .json) takes them for a file of its own.
TEMP_SUFFIX: Final = ".weir-tmp"


def write_atomically(
    path: Path, data: bytes, mode: int = 0o600, *, owner: tuple[int, int] | None = None
) -> None:
    """Replace `path` by `data`, with exactly `mode` (no umask) and `owner` (uid, gid) if given.

    On failure `path` is as it was and no temporary file is left behind.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the renames and removals done in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
