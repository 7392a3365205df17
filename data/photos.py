"""One photo path: photos read, made upright, transformed for a model and batched by shape.

The paper's evaluation transform resizes the longest side to 300 px (section 4.2), so a landscape photo, a
portrait and a panorama come out with different shapes. A batch stacks photos of one shape only: padding
would change the pooled features, so the same photo would get another position in another batch. Training,
feature extraction, ``geoswc evaluate``, ``geoswc tag`` and ``Geolocator.predict`` all read photos here:

    dataset = PhotoDataset(paths, transform)             # index -> (index, pixels or None, error or None)
    for batch in photo_batches(dataset, batch_size=32, workers=4):
        batch.indices, batch.pixels                      # one shape, at most 32 photos
        batch.errors                                     # {index: reason} of photos that cannot be read

A photo that cannot be read (missing, corrupt, not an image, HEIC without pillow-heif, ...) is an entry of
``errors`` with a one-line reason, never an exception, so one bad file cannot stop a run over millions.

``PhotoDataset(..., exif_gps=True)`` also reads each photo's EXIF GPS position in the worker, from the bytes it
decodes (the file is read once): ``batch.gps`` holds ``{index: (lat, lon)}``; with ``skip_geotagged=True`` a
photo that has a position is not decoded at all and comes out in ``batch.skipped``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .exif import gps_from_bytes, gps_from_exif
from .images import PhotoError, decode_photo, load_photo, photo_format, read_photo_bytes

logger = logging.getLogger(__name__)

PhotoSource = Union[str, os.PathLike, Image.Image, np.ndarray]
LatLon = Tuple[float, float]
# (index, pixels, error), and the EXIF GPS position last when the dataset reads it (``exif_gps``).
Item = Union[
    Tuple[int, Optional[torch.Tensor], Optional[str]],
    Tuple[int, Optional[torch.Tensor], Optional[str], Optional[LatLon]],
]
# The per-shape chunks of a collated batch, ``[(indices, stacked pixels)]``.
Groups = List[Tuple[np.ndarray, torch.Tensor]]


class PhotoDataset(Dataset):
    """Photos (paths, PIL images or ``(H, W, 3)`` uint8 arrays) through one transform.

    Items are ``(index, pixels, error)``: ``pixels`` the transformed ``(3, H, W)`` tensor, or None with
    ``error`` the reason the photo cannot be used. With ``exif_gps`` they are ``(index, pixels, error, gps)``,
    ``gps`` the photo's EXIF GPS ``(lat, lon)`` in degrees or None; a photo skipped for having one
    (``skip_geotagged``) has neither pixels nor error.

    Args:
        sources: the photos; paths are read with `geoswc.data.images.load_photo` (format sniffed from the
            content, EXIF orientation applied, JPEGs decoded at reduced size).
        transform: image -> ``(3, H, W)`` tensor. geoswc's transforms (`build_transform`) take decoded arrays
            and say what size to decode at (``decode_target``, ``decode_side``); any other transform (e.g.
            torchvision's) gets a PIL image.
        target: the side JPEGs are decoded down to; default the transform's ``decode_target``.
        max_target_pixels: with a ``target``, photos that would decode to more pixels (any format but JPEG
            decodes at full size) are errors, refused before decoding, so that a few decode workers cannot
            exhaust memory on small files that declare huge images; default
            `geoswc.data.images.MAX_TARGET_PIXELS`.
        exif_gps: also read each photo's EXIF GPS position (`geoswc.data.exif.read_gps`), from the bytes
            read for decoding (paths) or from the image's EXIF (PIL images); arrays have none. Unreadable or
            damaged EXIF is no position, never an error.
        skip_geotagged: do not decode photos that have an EXIF GPS position: their item carries only the
            position (implies ``exif_gps``). A damaged photo with a readable position is skipped too, as
            checking the position first would.
    """

    def __init__(
        self,
        sources: Sequence[PhotoSource],
        transform: Callable,
        *,
        target: Optional[int] = None,
        max_target_pixels: Optional[int] = None,
        exif_gps: bool = False,
        skip_geotagged: bool = False,
    ):
        self.sources = sources
        self.transform = transform
        self.max_target_pixels = max_target_pixels
        self.target = target if target is not None else getattr(transform, "decode_target", None)
        self.target_side = getattr(transform, "decode_side", "short")
        self.as_array = bool(getattr(transform, "accepts_arrays", False))
        self.skip_geotagged = skip_geotagged
        self.exif_gps = exif_gps or skip_geotagged

    def __len__(self) -> int:
        return len(self.sources)

    def read(self, index: int):
        """The decoded photo ``index``, as the transform takes it.

        Raises:
            PhotoError: with the reason the photo cannot be used.
        """
        source = self.sources[index]
        if isinstance(source, Image.Image):
            image = source.convert("RGB") if source.mode != "RGB" else source
            return np.asarray(image) if self.as_array else image
        if isinstance(source, np.ndarray):
            if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
                raise PhotoError(f"an image array must be (H, W, 3) uint8, got {source.shape} {source.dtype}")
            return source if self.as_array else Image.fromarray(source, "RGB")
        return load_photo(os.fspath(source), **self._decode_options())

    def _decode_options(self) -> dict:
        return dict(
            target=self.target,
            target_side=self.target_side,
            as_array=self.as_array,
            max_target_pixels=self.max_target_pixels,
            decoder=getattr(self.transform, "decoder", "auto"),
        )

    def _read_with_gps(self, index: int) -> Tuple[Optional[LatLon], Callable[[], object]]:
        """Photo ``index``'s EXIF GPS position and a function decoding it, from one read of its file.

        Raises:
            PhotoError: the file cannot be read.
        """
        source = self.sources[index]
        if isinstance(source, (str, os.PathLike)):
            data = read_photo_bytes(os.fspath(source))
            photo_format(data)  # a HEIF's position is readable once pillow-heif's opener is registered
            return gps_from_bytes(data), lambda: decode_photo(data, **self._decode_options())
        position = None
        if isinstance(source, Image.Image):
            try:
                position = gps_from_exif(source.getexif())
            except Exception as err:  # damaged EXIF is no position, as for a file
                logger.debug("no EXIF GPS read from photo %d: %s", index, err)
        return position, lambda: self.read(index)

    def __getitem__(self, index: int) -> Item:
        position = None
        try:
            if self.exif_gps:
                position, decode = self._read_with_gps(index)
                if position is not None and self.skip_geotagged:
                    return index, None, None, position
                pixels, error = self.transform(decode()), None
            else:
                pixels, error = self.transform(self.read(index)), None
        except PhotoError as err:
            pixels, error = None, str(err)
        except Exception as err:  # a transform failing on an odd image is still one photo's problem
            logger.debug("unexpected failure on photo %d", index, exc_info=True)
            pixels, error = None, f"unexpected error ({type(err).__name__}: {err})"
        return (index, pixels, error, position) if self.exif_gps else (index, pixels, error)

    def describe(self, index: int) -> str:
        """How photo ``index`` is named in an error message."""
        source = self.sources[index]
        return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"photo {index}"


@dataclass
class PhotoBatch:
    """Photos of one transformed shape, and the photos read since the last batch that could not be used.

    Attributes:
        indices: ``(B,)`` dataset indices of ``pixels``' rows; empty when the batch only carries errors
            (or skipped photos).
        pixels: ``(B, 3, H, W)``, or None when ``indices`` is empty.
        errors: ``{index: reason}``.
        gps: ``{index: (lat, lon)}``, the EXIF GPS positions of the batch's photos (rows, errors, skipped)
            that have one; filled only by a dataset that reads them (``exif_gps``).
        skipped: indices of photos not decoded because they have a position (``skip_geotagged``).
    """

    indices: np.ndarray
    pixels: Optional[torch.Tensor]
    errors: Dict[int, str] = field(default_factory=dict)
    gps: Dict[int, LatLon] = field(default_factory=dict)
    skipped: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)


def group_with_gps(items: List[Item]) -> Tuple[Groups, Dict[int, str], Dict[int, LatLon], List[int]]:
    """`group_by_shape` for items that carry EXIF GPS (a dataset with ``exif_gps``): also the positions
    ``{index: (lat, lon)}`` of the photos that have one and the indices of the photos skipped for having one
    (neither pixels nor error)."""
    groups: Dict[Tuple[int, ...], List[Tuple[int, torch.Tensor]]] = {}
    errors: Dict[int, str] = {}
    positions: Dict[int, LatLon] = {}
    skipped: List[int] = []
    for item in items:
        index, pixels, error = item[:3]
        position = item[3] if len(item) > 3 else None
        if position is not None:
            positions[index] = position
        if pixels is not None:
            groups.setdefault(tuple(pixels.shape), []).append((index, pixels))
        elif error is None and position is not None:
            skipped.append(index)
        else:
            errors[index] = error or "unreadable"
    stacked = [
        (np.array([i for i, _ in group], dtype=np.int64), torch.stack([p for _, p in group]))
        for group in groups.values()
    ]
    return stacked, errors, positions, skipped


def group_by_shape(items: List[Item]) -> Tuple[Groups, Dict[int, str]]:
    """A DataLoader batch of items as ``[(indices, stacked pixels)]``, one entry per shape (first seen first),
    and the errors. Runs in the loader's workers, so the stacking is done there."""
    stacked, errors, _, _ = group_with_gps(items)
    return stacked, errors


def batch_by_shape(
    groups: Iterable[Sequence],
    batch_size: int,
    *,
    max_pending: Optional[int] = None,
) -> Iterator[PhotoBatch]:
    """Regroup per-shape chunks (`group_by_shape` or `group_with_gps` output) into batches of one shape and
    at most ``batch_size`` photos; errors and skipped photos go out at once, each position with its photo.

    Photos of a shape wait until ``batch_size`` of them are there, so a batch is full whenever the photos
    allow; when more than ``max_pending`` (default ``4 * batch_size``) photos wait, the largest group goes
    out early, which bounds memory when many shapes occur. Every photo comes out exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_pending = 4 * batch_size if max_pending is None else max_pending
    pending: Dict[Tuple[int, ...], List[Tuple[np.ndarray, torch.Tensor]]] = {}
    pending_gps: Dict[int, LatLon] = {}
    waiting = 0

    def take(shape: Tuple[int, ...], count: int) -> PhotoBatch:
        nonlocal waiting
        chunks = pending.pop(shape)
        indices = np.concatenate([i for i, _ in chunks])
        pixels = chunks[0][1] if len(chunks) == 1 else torch.cat([p for _, p in chunks])
        if count < len(indices):
            pending[shape] = [(indices[count:], pixels[count:])]
            indices, pixels = indices[:count], pixels[:count]
        waiting -= len(indices)
        gps = {}
        if pending_gps:
            gps = {i: pending_gps.pop(i) for i in indices.tolist() if i in pending_gps}
        return PhotoBatch(indices, pixels, gps=gps)

    for group in groups:
        chunks, errors = group[0], group[1]
        # Pinned memory turns the (lat, lon) tuples into lists: positions are made tuples again here.
        positions = {i: (float(p[0]), float(p[1])) for i, p in group[2].items()} if len(group) > 2 else {}
        skipped = list(group[3]) if len(group) > 3 else []
        if errors or skipped:
            gps = {i: positions.pop(i) for i in [*errors, *skipped] if i in positions}
            yield PhotoBatch(np.zeros(0, dtype=np.int64), None, dict(errors), gps=gps, skipped=skipped)
        pending_gps.update(positions)
        for indices, pixels in chunks:
            shape = tuple(pixels.shape[1:])
            pending.setdefault(shape, []).append((indices, pixels))
            waiting += len(indices)
            while sum(len(i) for i, _ in pending.get(shape, ())) >= batch_size:
                yield take(shape, batch_size)
        while waiting > max_pending:
            largest = max(pending, key=lambda s: sum(len(i) for i, _ in pending[s]))
            yield take(largest, batch_size)
    for shape in list(pending):
        while shape in pending:
            yield take(shape, batch_size)


def _worker_init(_: int) -> None:
    # Workers decode; one thread each keeps them from fighting the model's threads for the cores.
    torch.set_num_threads(1)


def photo_loader(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    workers: int = 0,
    indices: Optional[Sequence[int]] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader reading ``dataset`` (or the given ``indices`` of it, in that order) in batches of
    ``batch_size`` photos, each collated by `group_by_shape` (`group_with_gps` for a dataset reading EXIF
    GPS) in the worker that decoded it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(range(len(dataset))) if indices is None else [int(i) for i in indices],
        num_workers=workers,
        collate_fn=group_with_gps if getattr(dataset, "exif_gps", False) else group_by_shape,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )


def photo_batches(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    workers: int = 0,
    indices: Optional[Sequence[int]] = None,
    pin_memory: bool = False,
    max_pending: Optional[int] = None,
) -> Iterator[PhotoBatch]:
    """Batches of one shape over ``dataset`` (all of it, or ``indices``), decoded by ``workers`` processes;
    see `batch_by_shape`. Photos that cannot be read arrive as ``errors``; with a dataset reading EXIF GPS,
    positions in ``gps`` and photos skipped for having one in ``skipped``."""
    loader = photo_loader(
        dataset, batch_size=batch_size, workers=workers, indices=indices, pin_memory=pin_memory
    )
    return batch_by_shape(loader, batch_size, max_pending=max_pending)
