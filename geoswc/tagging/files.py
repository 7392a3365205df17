"""The files a tag run keeps beside its output ``OUT``: errors that name the file, opening without following a
symbolic link, and reading a JSON object.

Every file geoswc creates next to an output (``OUT`` itself, ``OUT.lock``, ``OUT.run.json``, the row journals,
the embeddings and their journals, ``OUT.html``, the EXIF copies) is either written through
`geoswc.data.files.atomic_path` (a new file renamed over the name, which replaces a link rather than writing
through it) or opened here with ``O_NOFOLLOW``: a link planted at one of those names is refused with one line
naming it, never followed into the file it points at (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from typing import IO, List

from geoswc.data import files
from geoswc.data.files import json_safe as finite  # noqa: F401  (the row writers' name for it)

# Paths are file names from the OS: bytes that are not UTF-8 survive a round trip through the output.
ENCODING, ERRORS = "utf-8", "surrogateescape"
REPLACE_HINT = "use --overwrite to replace it"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class OutputError(OSError, ValueError):
    """The system refused to read or write a file of a run (disk full, permission denied, ...).

    ``str(err)`` is one line naming the file; ``filename`` is the file. It is a `ValueError` too, so a caller
    catching bad input catches it; the command line exits with status 1 for it, as for any refusal of the system.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def output_error(action: str, path: str, err: OSError) -> OutputError:
    """``err`` (raised while doing ``action`` to ``path``) as an `OutputError`: "cannot write tags.csv: ..."."""
    if err.errno == errno.ELOOP and os.path.islink(path):
        reason = "it is a symbolic link, which geoswc does not write through; remove the link"
    else:
        reason = err.strerror or str(err)
    return OutputError(err.errno, f"cannot {action} {path}: {reason}", path)


@contextlib.contextmanager
def os_errors(action: str, path: str):
    """Turn an `OSError` of the block into an `OutputError` naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        raise output_error(action, path, err) from err


def refuse_links(paths: List[str]) -> None:
    """Refuse symbolic links (dangling or not) at the names a run is about to create or write.

    Raises:
        OutputError: naming the first link.
    """
    for path in paths:
        if os.path.islink(path):
            raise output_error("write", path, OSError(errno.ELOOP, os.strerror(errno.ELOOP)))


def open_nofollow(path: str, mode: str, *, encoding=None, errors=None) -> IO:
    """``open(path, mode)`` for the writing modes ``a``, ``ab``, ``w``, ``wb``, ``r+b``, refusing a symbolic link
    at ``path`` (``O_NOFOLLOW``) instead of writing into the file it points at.

    Raises:
        OSError: ``ELOOP`` for a link (`os_errors` words it), or whatever ``open`` raises.
    """
    flags = {
        "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "r+b": os.O_RDWR,
    }[mode]
    fd = os.open(path, flags | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        binary = os.fdopen(fd, mode if "b" in mode else mode + "b")
    except BaseException:
        os.close(fd)
        raise
    if "b" in mode:
        return binary
    return io.TextIOWrapper(binary, encoding=encoding, errors=errors, newline="")


def read_json_object(path: str, *, what: str, hint: str = REPLACE_HINT) -> dict:
    """The JSON object in ``path`` (`geoswc.data.files.read_json_object`, with what to do about a damaged file).

    Raises:
        ValueError: the file is not valid JSON or holds something else than an object (naming ``path``,
            ``what`` it should be and ``hint``).
        OutputError: the file cannot be read.
    """
    with os_errors("read", path):
        return files.read_json_object(path, what=what, hint=hint)
