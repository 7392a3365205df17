"""A model folder built aside and swapped in: what ``geoswc import`` writes never half-replaces what was there.

`staged_model_folder` gives an empty staging folder beside the target (same parent, so the final renames stay on
one file system). When the build succeeds, the old folder is renamed aside, the new one renamed into its place,
and only then the old one deleted; when anything fails, the staging folder is removed and the target is left as
it was. Only a geoswc model folder (or an empty folder) is ever replaced: a folder of anything else is refused
before any work starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Union

logger = logging.getLogger(__name__)

# What makes a folder a geoswc model folder (`geoswc.geolocator.META_FILE`).
MODEL_MARKER = "geolocator.json"


def check_target(out: Union[str, os.PathLike], *, overwrite: bool) -> Path:
    """``out`` as a folder a model may be written to: absent, or (with ``overwrite``) an empty folder or a model
    folder.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false, or it is a link, a file, or a folder that is not
            a model folder (its first entries named).
    """
    out = Path(out)
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; give the real folder, a link is never replaced")
    if not out.exists():
        return out
    if not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass --overwrite")
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; --overwrite replaces only a model folder")
    marker = out / MODEL_MARKER
    if not marker.is_symlink() and marker.is_file():
        return out
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"{out} is not a geoswc model folder (no {MODEL_MARKER}; it holds {shown}); --overwrite replaces "
            "only a model folder: choose another folder"
        )
    return out


@contextlib.contextmanager
def staged_model_folder(out: Union[str, os.PathLike], *, overwrite: bool) -> Iterator[Path]:
    """An empty folder beside ``out`` to build the model in; swapped into ``out`` when the block succeeds.

    ``out`` is checked with `check_target` first (and again just before the swap, in case it appeared
    meanwhile).

    Raises:
        FileExistsError: see `check_target`.
    """
    out = check_target(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_folder(out, "building")
    try:
        yield staging
        check_target(out, overwrite=overwrite)
        swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_in(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is renamed aside first and deleted only once ``new`` is in
    place (restored if the second rename fails)."""
    if not out.exists():
        os.rename(new, out)
        return
    aside = _fresh_folder(out, "old")
    old = aside / out.name
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
    logger.info("replaced %s", out)


def _fresh_folder(out: Path, what: str) -> Path:
    """A new folder beside ``out`` under an unpredictable name (made by ``mkdir``, so never an existing link;
    with the usual permissions, unlike ``tempfile.mkdtemp``'s 0700, as it becomes the model folder)."""
    while True:
        path = out.parent / f".{out.name}.{what}-{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
