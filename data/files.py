"""Files written whole or not at all, and the small files every component reads back.

Writing: a temporary file with an unpredictable name beside the target, renamed over it when complete and
removed when anything fails. Every output geoswc writes in place (tag outputs, feature caches and their parts,
stage markers) goes through `atomic_path`, so a killed job leaves either the old file or the new one, never half
of one, and a temporary name cannot be guessed (or planted as a link) in a shared folder.

Reading: `read_json_object` (a JSON file that must hold an object), `read_safetensors_metadata` (the string
metadata of a weights file) and `load_safetensors_weights` (its tensors into a module) turn every malformed
file into one line that names it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from glob import escape as glob_escape
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterator, Union

import numpy as np

PathLike = Union[str, os.PathLike]


CACHE_ENV = "GEOSWC_CACHE"


def cache_dir() -> Path:
    """Where geoswc keeps per-machine caches (engine measurements, exported graphs, the gazetteer, the basemap):
    ``$GEOSWC_CACHE``, else ``$XDG_CACHE_HOME/geoswc``, else ``~/.cache/geoswc``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "geoswc"


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


def read_json_object(path: PathLike, *, what: str = "a JSON object", hint: str = "") -> Dict[str, Any]:
    """The JSON object stored in the file ``path``.

    Args:
        path: the file.
        what: what the object should be, for the message when it is something else (``"a JSON object"``).
        hint: what to do about a damaged file, appended to the message (``"; <hint>"``) when given.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not UTF-8 JSON, or holds something other than an object (file named).
    """
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}){tail}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected {what}, got {type(value).__name__}{tail}")
    return value


def read_safetensors_metadata(path: PathLike, *, what: str = "safetensors file") -> Dict[str, str]:
    """The string metadata of the safetensors file ``path`` (empty when it has none), tensors left unread.

    Args:
        path: the file.
        what: what the file holds, for the message when it is missing (``"head weights file"``).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a readable safetensors file (named in the message).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def load_safetensors_weights(module, path: PathLike, *, describe: str, device="cpu") -> None:
    """Load the tensors of the safetensors file ``path`` into ``module`` (a torch ``nn.Module``, strictly).

    Args:
        module: the module whose ``state_dict`` the file must match.
        path: the file.
        describe: what the tensors should fit, for the message (``"a 'ce' head of 1280 features"``).
        device: where the tensors are loaded.

    Raises:
        ValueError: ``"<path>: the tensors do not fit <describe>: <detail>"``, one line, when names or shapes
            differ or the file is damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(path), device=device))
    except (RuntimeError, SafetensorError) as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{path}: the tensors do not fit {describe}: {detail}") from None


def file_inside(
    directory: Path, name: Any, *, what: str, source: PathLike, folder: str = "a cells folder"
) -> Path:
    """``directory / name`` for a file name read from ``source`` (a manifest inside ``directory``).

    Refuses, without reading the file, a name that is not a relative path inside ``directory`` (absolute, with
    a drive, or with ``..``) or that resolves outside it through a link: error messages may quote a file's
    first lines, which must never come from an arbitrary file.

    Args:
        directory: the folder the names are relative to.
        name: the name as read.
        what: what the name is, for the message (``"partitions[0] file"``).
        source: the file the name was read from, named first in the message.
        folder: what ``directory`` is, for the message.

    Raises:
        ValueError: one line naming ``source``, the name and what is wrong.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{source}: {what} must be a file name inside {directory}, got {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts + windows.parts:
        raise ValueError(
            f"{source}: {what} {name!r} points outside {directory}; files of {folder} are named "
            "relative to it, without '..'"
        )
    path = Path(directory) / name
    if not path.resolve().is_relative_to(Path(directory).resolve()):
        raise ValueError(f"{source}: {what} {name!r} is a link that points outside {directory}")
    return path


def json_safe(value: Any) -> Any:
    """``value`` as JSON can carry it: non-finite floats become None (null), numpy scalars Python numbers,
    recursively through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.floating):
        return json_safe(float(value))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
