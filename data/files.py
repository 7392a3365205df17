"""Files written whole or not at all: a temporary file with an unpredictable name beside the target, renamed
over it when complete and removed when anything fails.

Every output geoswc writes in place (tag outputs, feature caches and their parts, stage markers) goes through
`atomic_path`, so a killed job leaves either the old file or the new one, never half of one, and a temporary
name cannot be guessed (or planted as a link) in a shared folder.
"""

from __future__ import annotations

import contextlib
import os
from glob import escape as glob_escape
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def new_file_mode() -> int:
    """The permission bits a new file gets under the current umask (``mkstemp`` itself creates 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A new empty temporary file beside ``path`` (unpredictable name, the mode a new file would get), renamed
    over ``path`` when the block ends without error and removed otherwise."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, new_file_mode())
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(path: PathLike) -> int:
    """Remove the temporary files `atomic_path` left beside ``path`` when its process was killed (SIGKILL
    skips the cleanup); returns how many there were. Only the one writer of ``path`` may call it."""
    path = Path(path)
    stale = list(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
