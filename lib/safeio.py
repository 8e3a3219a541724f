"""Files replaced all at once: a reader sees the old content or the new, never a mix.

    atomic_write(path, data, mode)   write data to a temporary file beside path, give it
                                     mode, fsync it, rename it over path, fsync the
                                     directory; OSError propagates, and no temporary is
                                     left behind
"""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, data: bytes, mode: int) -> None:
    """Replace path with data in one rename; the file has mode from its first byte on."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        # mkstemp creates the file 0600; it gets its final mode only when complete.
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
