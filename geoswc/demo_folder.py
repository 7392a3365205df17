"""The folder ``geoswc demo`` writes into, and what the demo may delete in it: only what it wrote.

A demo folder is marked with `DEMO_MARKER`, a small JSON file the demo writes first and in which it records the
photos it copied for tagging. A rerun into the same folder reuses it; a folder that is not empty and not marked
(a folder of the user's) is refused before anything is written. When the synthetic world must be written again,
only the world's own files are removed (its CSVs, sidecars and the images they list); the photos folder may
hold only the photos the demo copied, as the demo tags all of it, and a rerun replaces those photos only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import List, Sequence

import pandas as pd

logger = logging.getLogger(__name__)

DEMO_MARKER = ".geoswc-demo.json"
# What `geoswc.data.synth.make_world` writes beside ``images/``.
WORLD_FILES = ("train.csv", "test.csv", "landmarks.csv", "photo_landmarks.csv", "world.json")


def claim_demo_folder(out: Path) -> List[str]:
    """Make ``out`` the demo's folder (new, empty, or written by an earlier demo) and mark it.

    Returns:
        The names of the photos an earlier demo copied into ``out/photos`` (recorded in the marker).

    Raises:
        ValueError: ``out`` is a link or a file, or a non-empty folder the demo did not write (its first entries
            named).
    """
    if out.is_symlink():
        raise ValueError(f"-o {out} is a symbolic link; give the folder itself")
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out} exists and is not a folder")
    marker = out / DEMO_MARKER
    # A demo of an earlier geoswc left demo.json (written last) but no marker.
    marked = (marker.is_file() and not marker.is_symlink()) or (out / "demo.json").is_file()
    if out.is_dir() and not marked:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(
                f"-o {out} is not empty ({shown}) and no geoswc demo wrote it (no {DEMO_MARKER}); the demo "
                "writes into a new or empty folder, or one an earlier demo wrote: choose another folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    if marker.is_file() and not marker.is_symlink():
        photos = _recorded_photos(marker)
    else:
        photos = _photos_of_an_older_demo(out)
    _write_marker(out, photos)
    return photos


def check_photos_folder(photos: Path, recorded: Sequence[str]) -> None:
    """The photos folder holds nothing but the photos the demo copied (it tags the whole folder, and a rerun
    replaces them).

    Raises:
        ValueError: an entry the demo did not write (named).
    """
    if photos.is_symlink():
        raise ValueError(f"{photos} is a symbolic link; the demo writes its own photos folder")
    if not photos.exists():
        return
    if not photos.is_dir():
        raise ValueError(f"{photos} exists and is not a folder; move it away, the demo copies photos there")
    own = set(recorded)
    for entry in sorted(photos.iterdir()):
        if entry.name not in own or entry.is_symlink() or not entry.is_file():
            raise ValueError(
                f"{entry} was not written by geoswc demo; the demo tags every photo in {photos} and replaces "
                "its own: move it away or choose another folder"
            )


def copy_photos(out: Path, world: Path, count: int, recorded: Sequence[str]) -> List[str]:
    """Replace the photos an earlier demo copied into ``out/photos`` with the first ``count`` test photos of
    ``world`` (flat, original file names, as an archive would hold them) and record them in the marker."""
    photos = out / "photos"
    check_photos_folder(photos, recorded)
    for name in recorded:
        (photos / name).unlink(missing_ok=True)
    photos.mkdir(parents=True, exist_ok=True)
    ids = pd.read_csv(world / "test.csv")["IMG_ID"].astype(str).tolist()[:count]
    names = [Path(img_id).name for img_id in ids]
    _write_marker(out, names)
    for img_id, name in zip(ids, names):
        shutil.copy2(world / "images" / img_id, photos / name)
    return ids


def remove_world(folder: Path) -> None:
    """Remove what `make_world` wrote in ``folder`` (the images its CSVs list, the CSVs and sidecars; of a world
    whose writing was interrupted, its ``images/XX/YY/*.jpg``) and the image folders left empty; anything else
    stays.

    Raises:
        ValueError: ``folder`` is a link or a file, or holds what no synthetic world holds (named).
    """
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{folder} is not a synthetic world geoswc demo wrote; move it away")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in WORLD_FILES + ("images",))
    if foreign:
        raise ValueError(
            f"{folder / foreign[0]} was not written by geoswc demo; the demo rewrites {folder}: move it away"
        )
    images = folder / "images"
    if (folder / "world.json").is_file():
        listed = [
            images / img_id
            for name in ("train.csv", "test.csv")
            if (folder / name).is_file()
            for img_id in pd.read_csv(folder / name, usecols=["IMG_ID"])["IMG_ID"].astype(str)
        ]
    else:
        listed = sorted(images.glob("*/*/*.jpg"))
    root = images.resolve()
    for path in listed:
        if path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(root):
            path.unlink()
    for name in WORLD_FILES:
        if (folder / name).is_file() or (folder / name).is_symlink():
            (folder / name).unlink()
    if images.is_dir() and not images.is_symlink():
        for current, _, _ in sorted(os.walk(images), key=lambda item: -len(item[0])):
            if not any(Path(current).iterdir()):
                Path(current).rmdir()
    if images.exists():
        logger.warning("%s: kept files the demo did not write", images)


def _photos_of_an_older_demo(out: Path) -> List[str]:
    """The photos a demo of an earlier geoswc (no marker) copied: those of ``photos/`` named like a test photo
    of its world."""
    test_csv, photos = out / "world" / "test.csv", out / "photos"
    if not test_csv.is_file() or not photos.is_dir():
        return []
    names = {Path(i).name for i in pd.read_csv(test_csv, usecols=["IMG_ID"])["IMG_ID"].astype(str)}
    return sorted(p.name for p in photos.iterdir() if p.name in names and p.is_file() and not p.is_symlink())


def _recorded_photos(marker: Path) -> List[str]:
    try:
        photos = json.loads(marker.read_text()).get("photos", [])
    except (ValueError, AttributeError):
        raise ValueError(
            f"{marker}: not the JSON geoswc demo writes; remove it if this is a demo folder"
        ) from None
    if not isinstance(photos, list) or not all(isinstance(p, str) and p == Path(p).name for p in photos):
        raise ValueError(f"{marker}: photos must be a list of file names")
    return photos


def _write_marker(out: Path, photos: Sequence[str]) -> None:
    marker = out / DEMO_MARKER
    text = json.dumps({"written_by": "geoswc demo", "photos": list(photos)}, indent=2) + "\n"
    tmp = out / f"{DEMO_MARKER}.tmp"
    tmp.unlink(missing_ok=True)
    with open(tmp, "x") as f:
        f.write(text)
    os.replace(tmp, marker)
