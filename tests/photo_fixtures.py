"""A folder of real photos of mixed shapes and formats, as a photo archive holds them.

The paper's evaluation transform resizes the longest side only (``eval_resize: longest``), so these photos
come out with different tensor shapes: landscape, portrait, square, a 4:1 panorama, a thumbnail smaller than
the model's input, a JPEG whose EXIF orientation turns it portrait, and PNG and WebP files of both
orientations. Each photo holds its own gradient plus noise, so no two have the same features.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import piexif
from PIL import Image


@dataclass(frozen=True)
class PhotoInfo:
    """One written photo.

    Attributes:
        path: the file.
        size: ``(width, height)`` of the photo as it is seen upright (after its EXIF orientation).
        stored: ``(width, height)`` of the pixels as stored in the file.
        format: the Pillow format it was written in.
    """

    path: Path
    size: Tuple[int, int]
    stored: Tuple[int, int]
    format: str


# name -> (stored width, stored height, format, EXIF orientation)
MIXED_PHOTOS = {
    "landscape.jpg": (64, 48, "JPEG", 1),
    "portrait.jpg": (48, 64, "JPEG", 1),
    "square.png": (50, 50, "PNG", 1),
    "panorama.jpg": (200, 50, "JPEG", 1),
    "thumbnail.jpg": (20, 15, "JPEG", 1),
    # Stored landscape; Orientation=6 (rotate 90 degrees clockwise to view) makes it a 40x64 portrait.
    "rotated.jpg": (64, 40, "JPEG", 6),
    "tall.png": (30, 45, "PNG", 1),
    "wide.webp": (70, 30, "WEBP", 1),
    "slim.webp": (36, 60, "WEBP", 1),
}


def photo_pixels(name: str, width: int, height: int) -> np.ndarray:
    """``(height, width, 3)`` uint8: a gradient whose direction and colours depend on ``name``, plus noise."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / max(width - 1, 1) + np.sin(angle) * y / max(height - 1, 1) + 1) / 2
    low, high = rng.uniform(0, 120, size=3), rng.uniform(135, 255, size=3)
    image = low + ramp[..., None] * (high - low) + rng.normal(scale=25, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def upright_size(width: int, height: int, orientation: int) -> Tuple[int, int]:
    """``(width, height)`` as viewed: orientations 5-8 swap the sides."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def write_photo(path: Path, pixels: np.ndarray, fmt: str, *, orientation: int = 1) -> None:
    image = Image.fromarray(pixels, "RGB")
    options = {}
    if fmt == "JPEG":
        options["quality"] = 95
        if orientation != 1:
            options["exif"] = piexif.dump({"0th": {piexif.ImageIFD.Orientation: orientation}})
    elif fmt == "WEBP":
        options["quality"] = 90
    image.save(path, format=fmt, **options)


def make_mixed_photos(folder) -> Dict[str, PhotoInfo]:
    """Write the photos of `MIXED_PHOTOS` into ``folder`` (created if needed).

    Returns:
        ``{file name: PhotoInfo}``, names in sorted order (the order a folder walk finds them).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos = {}
    for name in sorted(MIXED_PHOTOS):
        width, height, fmt, orientation = MIXED_PHOTOS[name]
        path = folder / name
        write_photo(path, photo_pixels(name, width, height), fmt, orientation=orientation)
        photos[name] = PhotoInfo(path, upright_size(width, height, orientation), (width, height), fmt)
    return photos


def make_unreadable_files(folder) -> Dict[str, Path]:
    """Files an archive also holds, none of which is a usable photo.

    Returns:
        ``{kind: path}`` for ``corrupt`` (a JPEG cut after its first third), ``empty`` (zero bytes),
        ``missing`` (a path that does not exist) and ``text`` (a text file named ``.jpg``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    whole = folder / "whole.jpg"
    write_photo(whole, photo_pixels("corrupt", 64, 48), "JPEG")
    data = whole.read_bytes()
    whole.unlink()
    files = {
        "corrupt": folder / "corrupt.jpg",
        "empty": folder / "empty.jpg",
        "missing": folder / "missing.jpg",
        "text": folder / "notes.jpg",
    }
    files["corrupt"].write_bytes(data[: len(data) // 3])
    files["empty"].write_bytes(b"")
    files["text"].write_text("not a photo: a shopping list\neggs\nflour\n")
    return files
