"""Opening only regular files: a FIFO, device or socket is refused before it is read.

A FIFO without a writer blocks ``open`` forever and a device such as ``/dev/zero`` never reaches its end, so
every photo read (decoding, sniffing in a folder walk, tagging) opens through `open_regular`.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Union


class NotRegularFile(Exception):
    """A path that names a FIFO, device or socket; ``reason`` says which."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular_reason(mode: int) -> str:
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def open_regular(path: Union[str, os.PathLike]):
    """Open a regular file for binary reading; never a FIFO, device or socket.

    A FIFO without a writer blocks ``open`` forever and a device such as ``/dev/zero`` never reaches its end,
    so the path is checked before opening. The open itself is non-blocking and re-checked on the descriptor,
    so a file swapped for a FIFO between the check and the open cannot block either.

    Raises:
        NotRegularFile: the path is not a regular file (directories raise ``IsADirectoryError``).
        OSError: as ``open`` does (``FileNotFoundError``, ``PermissionError``, ...).
    """
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", os.fspath(path))
    if not stat.S_ISREG(mode):
        raise NotRegularFile(not_regular_reason(mode))
    nonblock = getattr(os, "O_NONBLOCK", 0)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0) | nonblock
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(not_regular_reason(mode))
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
