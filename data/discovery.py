"""Photo collections: `discover(inputs)` expands files, folders (recursive, hidden entries skipped, symlink
cycles visited once), globs and ``@list.txt`` files into one deterministic list of `PhotoFile`; `sniff(head)`
names the format from a file's first bytes (JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC/HEIF) whatever its extension
says.

Only regular files are ever opened: folder walks and globs skip FIFOs and devices (counted as not photos).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import stat
from typing import List, Optional, Sequence, Tuple

from .regular_files import NotRegularFile, open_regular

logger = logging.getLogger(__name__)

# Extensions of the formats `sniff` recognises: a file with one of these is a photo candidate in a folder walk
# even when its content is damaged, so that a corrupt or empty ``IMG_0001.jpg`` becomes an error row.
PHOTO_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .bmp .dib .tif .tiff .gif .heic .heif .hif".split()
)
HEIF_BRANDS = frozenset(
    [b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"]
)
SNIFF_BYTES = 32


@dataclasses.dataclass(frozen=True)
class PhotoFile:
    """A photo found by `discover`.

    Attributes:
        path: the path as written in the output (the input's spelling, normalised).
        rel: the path relative to the common root of all inputs, used to lay out ``--write-exif`` copies.
        explicit: named on the command line or in a list file (not found by a folder walk or glob).
    """

    path: str
    rel: str
    explicit: bool


@dataclasses.dataclass
class Discovery:
    """The outcome of `discover`: the photos in order and what was passed over."""

    photos: List[PhotoFile]
    root: Optional[str] = None
    skipped_not_photo: int = 0
    skipped_hidden: int = 0
    unreadable_folders: List[str] = dataclasses.field(default_factory=list)


def sniff(head: bytes) -> Optional[str]:
    """The image format the first bytes of a file announce, or None.

    Returns one of ``JPEG``, ``PNG``, ``WEBP``, ``BMP``, ``TIFF``, ``GIF``, ``HEIF``.
    """
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "HEIF"
    return None


def _has_glob_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _glob_root(pattern: str) -> str:
    """The folder a glob pattern is anchored at (its longest prefix without wildcards)."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if _has_glob_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.curdir


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_photo_candidate(path: str) -> bool:
    """Folder walks keep regular files with a photo extension, or whose content `sniff` recognises.

    FIFOs, devices and sockets are never photos, whatever their name, and are never opened: reading a FIFO
    blocks until someone writes to it and a device such as ``/dev/zero`` has no end.
    """
    try:
        mode: Optional[int] = os.stat(path).st_mode
    except OSError:
        mode = None  # broken link, no permission, vanished: decided below as before
    if mode is not None and not stat.S_ISREG(mode):
        return False
    if os.path.splitext(path)[1].lower() in PHOTO_EXTENSIONS:
        return True
    try:
        with open_regular(path) as f:
            return sniff(f.read(SNIFF_BYTES)) is not None
    except NotRegularFile:
        return False
    except OSError:
        # Cannot tell (no permission, vanished): keep it so its row says why instead of dropping it silently.
        return True


class _Walker:
    def __init__(self):
        self.found: List[Tuple[str, str, bool]] = []  # (path, root, explicit)
        self.seen_paths = set()
        self.seen_dirs = set()
        self.result = Discovery(photos=[])

    def add_file(self, path: str, root: str, explicit: bool):
        path = os.path.normpath(path)
        key = os.path.abspath(path)
        if key in self.seen_paths:
            return
        self.seen_paths.add(key)
        self.found.append((path, root, explicit))

    def walk(self, folder: str, root: str):
        try:
            info = os.stat(folder)
        except OSError as err:
            self._unreadable(folder, err)
            return
        # A folder reached twice (symlink cycle or two links to it) is walked once.
        ident = (info.st_dev, info.st_ino)
        if ident in self.seen_dirs:
            logger.debug("already walked %s", folder)
            return
        self.seen_dirs.add(ident)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            self._unreadable(folder, err)
            return
        for entry in entries:
            if _is_hidden(entry.name):
                self.result.skipped_hidden += 1
                continue
            path = os.path.join(folder, entry.name)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError:
                is_dir, is_file = False, True
            if is_dir:
                self.walk(path, root)
            elif is_file:
                if _is_photo_candidate(path):
                    self.add_file(path, root, explicit=False)
                else:
                    self.result.skipped_not_photo += 1
            # Broken symlinks, FIFOs, sockets and devices are not photos (and are never opened).
            else:
                self.result.skipped_not_photo += 1

    def _unreadable(self, folder: str, err: OSError):
        logger.warning("cannot read folder %s: %s", folder, err.strerror or err)
        self.result.unreadable_folders.append(folder)

    def add_input(self, item: str, *, from_list: Optional[str] = None):
        if item.startswith("@") and from_list is None:
            self.add_list(item[1:])
        elif os.path.isdir(item):
            self.walk(item, item)
        elif os.path.lexists(item):
            self.add_file(item, os.path.dirname(item) or os.curdir, explicit=True)
        elif _has_glob_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                logger.warning("no file matches %s", item)
            root = _glob_root(item)
            for match in matches:
                if any(_is_hidden(part) for part in os.path.relpath(match, root).split(os.sep)):
                    self.result.skipped_hidden += 1
                elif os.path.isdir(match):
                    self.walk(match, root)
                elif _is_photo_candidate(match):
                    self.add_file(match, root, explicit=False)
                else:
                    self.result.skipped_not_photo += 1
        elif from_list is not None:
            # A listed file that is gone still gets its row: the list promised it.
            self.add_file(item, os.path.dirname(item) or os.curdir, explicit=True)
        else:
            raise FileNotFoundError(f"input {item!r} is not a file, folder, glob or @list")

    def add_list(self, list_path: str):
        try:
            with open(list_path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError as err:
            raise FileNotFoundError(f"cannot read list file {list_path!r}: {err.strerror or err}") from None
        base = os.path.dirname(list_path)
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # Relative entries are relative to the list file, so a list travels with its archive.
            self.add_input(os.path.join(base, line), from_list=list_path)


def discover(inputs: Sequence[str]) -> Discovery:
    """Expand command-line inputs into the photos to tag, in a deterministic order.

    Args:
        inputs: files, folders, glob patterns, or ``@list.txt`` (one file, folder or glob per line; relative
            lines are relative to the list's folder; blank lines and ``#`` comments are ignored).

    Files named explicitly (directly or in a list) are always kept, so that a non-photo among them gets an
    error row (a FIFO or device named explicitly gets "not a regular file" from `load_photo`). Folder walks
    and globs keep regular files with a photo extension or photo content and count the rest, FIFOs, devices
    and sockets included, as skipped without opening them; hidden files and folders (name starting with
    ``.``) are skipped there.

    Raises:
        FileNotFoundError: an input is neither an existing path, a glob nor a readable list.
    """
    walker = _Walker()
    for item in inputs:
        walker.add_input(item)
    photos = []
    if walker.found:
        common = os.path.commonpath([os.path.abspath(root) for _, root, _ in walker.found])
        for path, _, explicit in walker.found:
            photos.append(
                PhotoFile(path=path, rel=os.path.relpath(os.path.abspath(path), common), explicit=explicit)
            )
        walker.result.root = common
    walker.result.photos = photos
    return walker.result
