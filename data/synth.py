"""A synthetic world in the MP16 / Im2GPS format, where location shows in the pixels at two scales.

The paper's claim (ICMR 2021, sections 1 and 3) is that a cell classifier places a photo within its region but
cannot pin it down, while retrieval among the training photos of that cell finds the exact place when the photo
shows something recognisable. This world reproduces that in miniature:

* **Regional appearance** - every photo's background (sky and ground colours, horizon height, the orientation,
  frequency and contrast of a ground texture) is a smooth function of the 3-D unit vector of its location:
  random Fourier features with wavelengths of thousands of km, so appearance changes over hundreds of km. A
  classifier learns it and gets the region right (750-2500 km) but nothing finer.
* **Landmarks** - a few hundred fixed random patterns, each at a real photo location (drawn from the MP16
  coordinate sample, so several landmarks share a cell). Photos of a landmark are taken within a few hundred
  metres of it and show it from a random viewpoint (scale, offset, aspect, rotation, brightness, noise). Only
  matching the pattern against training photos locates these within 1 km.
* **Photos without a landmark** (35 % by default), placed at sampled MP16 locations with a few km of jitter.

Locations follow MP16's real distribution (``assets/mp16_coords_sample.csv``). Output, exactly the format the
real data comes in: ``train.csv`` / ``test.csv`` with ``IMG_ID,AUTHOR,LAT,LON`` (IMG_ID a relative path such as
``3f/a2/4821937465.jpg``), JPEGs under ``images/``; sidecars for diagnostics: ``landmarks.csv``
(``LANDMARK,LAT,LON``), ``photo_landmarks.csv`` (``SPLIT,IMG_ID,LANDMARK``, -1 = none) and ``world.json``.
Every photo is rendered from its own seeded generator, so the world is identical for a seed whatever the number
of worker processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .images import encode_jpeg
from .sphere import destination_deg, latlon_to_unit

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 128  # long side; photos are 4:3 landscape, 128 x 96
_N_PARAMS = 10  # regional appearance parameters, see _render_background
_N_WAVES = 6
_TEXTURE = 48  # landmark pattern resolution


def load_coordinate_sample() -> np.ndarray:
    """The packaged MP16 coordinate sample, ``(20000, 2)`` degrees ``(lat, lon)``."""
    with resources.files("geoswc.data").joinpath("assets/mp16_coords_sample.csv").open("r") as f:
        frame = pd.read_csv(f)
    return frame[["LAT", "LON"]].to_numpy(dtype=np.float64)


@dataclass
class RegionalField:
    """Smooth appearance parameters in [0, 1] as functions of position on the sphere.

    Each parameter is ``sigmoid(sum_j a_j sin(w_j . v + phi_j))`` over unit vectors ``v``; with ``|w|`` between
    4 and 12 per radian, the shortest wavelength is ~3,300 km, so the parameters change noticeably over a few
    hundred km and not at all over a few km.
    """

    waves: np.ndarray  # (n_params, n_waves, 3)
    phases: np.ndarray  # (n_params, n_waves)
    amplitudes: np.ndarray  # (n_params, n_waves)

    @classmethod
    def random(
        cls, rng: np.random.Generator, n_params: int = _N_PARAMS, n_waves: int = _N_WAVES
    ) -> "RegionalField":
        directions = rng.normal(size=(n_params, n_waves, 3))
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
        norms = rng.uniform(4.0, 12.0, size=(n_params, n_waves, 1))
        return cls(
            waves=directions * norms,
            phases=rng.uniform(0, 2 * np.pi, size=(n_params, n_waves)),
            amplitudes=rng.uniform(0.5, 1.0, size=(n_params, n_waves)) * 2.5 / math.sqrt(n_waves),
        )

    def __call__(self, latlon: np.ndarray) -> np.ndarray:
        """``(N, 2)`` degrees -> ``(N, n_params)`` parameters in [0, 1]."""
        v = latlon_to_unit(np.asarray(latlon, dtype=np.float64).reshape(-1, 2))
        z = np.einsum("nd,pwd->npw", v, self.waves) + self.phases[None]
        s = np.sum(self.amplitudes[None] * np.sin(z), axis=-1)
        return 1.0 / (1.0 + np.exp(-s))


@lru_cache(maxsize=4096)
def landmark_texture(landmark_seed: int) -> np.ndarray:
    """The fixed pattern of one landmark, ``(48, 48, 3)`` float32 in [0, 1], generated from its seed."""
    rng = np.random.default_rng(landmark_seed)
    t = _TEXTURE
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float64) / t
    texture = np.empty((t, t, 3))
    texture[:] = rng.uniform(0, 1, size=3)
    for _ in range(rng.integers(4, 8)):
        colour = rng.uniform(0, 1, size=3)
        kind = rng.integers(0, 4)
        cx, cy = rng.uniform(0.15, 0.85, size=2)
        rx, ry = rng.uniform(0.08, 0.3, size=2)
        if kind == 0:  # rectangle
            mask = (np.abs(xx - cx) < rx) & (np.abs(yy - cy) < ry)
        elif kind == 1:  # ellipse
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        elif kind == 2:  # triangle (roof / gable)
            mask = (yy > cy - ry) & (yy < cy + ry) & (np.abs(xx - cx) < rx * (yy - cy + ry) / (2 * ry))
        else:  # stripes in a band
            angle = rng.uniform(0, np.pi)
            band = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx * 1.5)
            mask = band & (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(20, 45)) > 0)
        texture[mask] = colour
    border = max(1, t // 24)
    texture[:border], texture[-border:], texture[:, :border], texture[:, -border:] = 0.05, 0.05, 0.05, 0.05
    texture = texture.astype(np.float32)
    texture.flags.writeable = False
    return texture


@dataclass
class _PhotoSpec:
    index: int
    split: int  # 0 train, 1 test
    params: np.ndarray  # regional parameters at the photo's location
    landmark: int  # -1: none
    path: str


def _render_background(
    rng: np.random.Generator, params: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Sky over textured ground; every colour and shape parameter comes from the regional field."""
    p = np.clip(params + rng.normal(0, 0.02, size=params.shape), 0, 1).astype(np.float32)
    sky = 0.12 + 0.76 * p[0:3]
    ground = 0.12 + 0.76 * p[3:6]
    horizon = np.float32(0.25 + 0.45 * p[6] + rng.normal(0, 0.03))
    blend = (np.tanh((yy - horizon) * np.float32(20.0)) * 0.5 + 0.5)[..., None]
    angle = np.pi * p[7]
    freq = 3.0 + 10.0 * p[8]
    contrast = np.float32(0.08 + 0.3 * p[9])
    kx, ky = np.float32(2 * np.pi * freq * np.cos(angle)), np.float32(2 * np.pi * freq * np.sin(angle))
    stripes = np.sin(xx * kx + yy * ky + np.float32(rng.uniform(0, 2 * np.pi)))
    ripple = np.sin(xx[:1] * np.float32(3 * np.pi) + np.float32(rng.uniform(0, 2 * np.pi)))
    ground_tex = ground * (1 + contrast * stripes[..., None])
    sky_tex = sky * (1 + np.float32(0.06) * ripple[..., None])
    return sky_tex + blend * (ground_tex - sky_tex)


def _paste_landmark(
    rng: np.random.Generator, image: np.ndarray, texture: np.ndarray, ys: np.ndarray, xs: np.ndarray
) -> None:
    """Draw the landmark pattern from a random viewpoint (scale, aspect, rotation, offset, lighting)."""
    height, width = image.shape[:2]
    size = height * rng.uniform(0.45, 0.85)
    aspect = rng.uniform(0.8, 1.25)
    angle = np.radians(rng.uniform(-15, 15))
    cx = width * rng.uniform(0.28, 0.72)
    cy = height * rng.uniform(0.35, 0.65)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx + sin * dy) / (size * aspect) + 0.5
    v = (-sin * dx + cos * dy) / size + 0.5
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    t = texture.shape[0]
    ui = np.clip((u * t).astype(np.int64), 0, t - 1)
    vi = np.clip((v * t).astype(np.int64), 0, t - 1)
    light = rng.uniform(0.75, 1.2) * (1 + rng.normal(0, 0.04, size=3))
    image[inside] = texture[vi[inside], ui[inside]] * light


def _render_photo(
    spec: _PhotoSpec, seed: int, grid: Tuple[np.ndarray, np.ndarray], texture: Optional[np.ndarray]
) -> np.ndarray:
    rng = np.random.default_rng([seed, spec.split, spec.index])
    ys, xs = grid
    height, width = ys.shape
    image = _render_background(rng, spec.params, (ys + 0.5) / height, (xs + 0.5) / width)
    if texture is not None:
        _paste_landmark(rng, image, texture, ys, xs)
    image *= np.float32(rng.uniform(0.85, 1.15) * 255)
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(0.02 * 255)
    np.clip(image, 0, 255, out=image)
    return (image + 0.5).astype(np.uint8)


def _render_chunk(args) -> int:
    specs, seed, shape, landmark_seeds, out_dir = args
    grid = tuple(np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32))
    for spec in specs:
        texture = landmark_texture(landmark_seeds[spec.landmark]) if spec.landmark >= 0 else None
        pixels = _render_photo(spec, seed, grid, texture)
        path = Path(out_dir) / spec.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(pixels, quality=90))
    return len(specs)


def _photo_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    ids = np.unique(rng.integers(1_000_000_000, 9_999_999_999, size=n + n // 10 + 16))
    return rng.permutation(ids)[:n]


def _img_id(photo_id: int) -> str:
    # MP16 spreads files over two levels of 2-character folders; mix the id so folders fill evenly.
    folder = (int(photo_id) * 2654435761) % 65536
    return f"{folder >> 8:02x}/{folder & 0xFF:02x}/{photo_id}.jpg"


def _authors(rng: np.random.Generator, n: int, used: set) -> List[str]:
    names: List[str] = []
    while len(names) < n:
        name = f"{rng.integers(10_000_000, 99_999_999)}@N{rng.integers(0, 8):02d}"
        if name not in used:
            used.add(name)
            names.append(name)
    return names


@dataclass
class WorldSpec:
    """What `make_world` wrote (also saved as ``world.json``)."""

    seed: int
    n_train: int
    n_test: int
    n_landmarks: int
    landmark_fraction: float
    landmark_radius_km: float
    image_width: int
    image_height: int


def make_world(
    out_dir: Union[str, os.PathLike],
    *,
    n_train: int = 4000,
    n_test: int = 400,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    n_landmarks: Optional[int] = None,
    landmark_fraction: float = 0.65,
    landmark_radius_km: float = 0.3,
    workers: int = 1,
    progress: bool = True,
) -> WorldSpec:
    """Write a synthetic geolocation dataset in the MP16 / Im2GPS format.

    Args:
        out_dir: folder to write ``train.csv``, ``test.csv``, ``images/`` and the sidecar files into.
        n_train: training photos.
        n_test: test photos (same landmarks from new viewpoints, plus photos without landmarks).
        seed: everything (locations, authors, appearance, landmark patterns, viewpoints) follows from it.
        image_size: long side in pixels; photos are 4:3 landscape.
        n_landmarks: number of landmarks; default ``round(n_train * landmark_fraction / 10)`` (about ten
            training photos per landmark; 260 for the default 4,000).
        landmark_fraction: share of photos that show a landmark.
        landmark_radius_km: photos of a landmark lie within this distance of it.
        workers: processes rendering images; the result does not depend on it.
        progress: show a progress bar.

    Returns:
        The `WorldSpec` (also written to ``world.json``).
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if not 0 <= landmark_fraction <= 1:
        raise ValueError(f"landmark_fraction must be in [0, 1], got {landmark_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coords = load_coordinate_sample()
    field = RegionalField.random(rng)

    if n_landmarks is None:
        n_landmarks = max(1, round(n_train * landmark_fraction / 10)) if landmark_fraction > 0 else 0
    n_landmarks = min(n_landmarks, len(coords))
    landmark_latlon = coords[rng.choice(len(coords), size=n_landmarks, replace=False)]
    landmark_seeds = rng.integers(0, 2**31, size=n_landmarks).tolist()

    placing = dict(
        coords=coords,
        landmark_latlon=landmark_latlon,
        landmark_fraction=landmark_fraction,
        landmark_radius_km=landmark_radius_km,
    )
    train_latlon, train_landmark = _place_photos(rng, n_train, training=True, **placing)
    test_latlon, test_landmark = _place_photos(rng, n_test, training=False, **placing)
    photo_ids = _photo_ids(rng, n_train + n_test)
    used: set = set()
    train_pool = _authors(rng, max(1, n_train // 8), used)
    test_pool = _authors(rng, max(1, n_test // 4), used)  # disjoint: the world is leak-free
    frames, specs = [], []
    for split, (latlon, landmark, pool) in enumerate(
        [(train_latlon, train_landmark, train_pool), (test_latlon, test_landmark, test_pool)]
    ):
        n = len(latlon)
        ids = photo_ids[:n] if split == 0 else photo_ids[n_train:]
        img_ids = [_img_id(p) for p in ids]
        authors = [pool[i] for i in rng.integers(0, len(pool), size=n)]
        frames.append(
            pd.DataFrame(
                {
                    "IMG_ID": img_ids,
                    "AUTHOR": authors,
                    "LAT": latlon[:, 0],
                    "LON": latlon[:, 1],
                    "LANDMARK": landmark,
                }
            )
        )
        params = field(latlon)
        specs += [
            _PhotoSpec(index=i, split=split, params=params[i], landmark=int(landmark[i]), path=img_ids[i])
            for i in range(n)
        ]

    width, height = image_size, max(1, round(image_size * 3 / 4))
    _render_images(
        specs, seed, (height, width), landmark_seeds, out / "images", workers=workers, progress=progress
    )
    _write_tables(out, frames, landmark_latlon)
    spec = WorldSpec(
        seed=seed,
        n_train=n_train,
        n_test=n_test,
        n_landmarks=n_landmarks,
        landmark_fraction=landmark_fraction,
        landmark_radius_km=landmark_radius_km,
        image_width=width,
        image_height=height,
    )
    (out / "world.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    logger.info(
        "synthetic world: %d train, %d test photos, %d landmarks in %s", n_train, n_test, n_landmarks, out
    )
    return spec


def _place_photos(
    rng: np.random.Generator,
    n: int,
    *,
    training: bool,
    coords: np.ndarray,
    landmark_latlon: np.ndarray,
    landmark_fraction: float,
    landmark_radius_km: float,
) -> Tuple[np.ndarray, np.ndarray]:
    """Positions ``(n, 2)`` and landmark indices (-1 for none) of ``n`` photos of one split: a share
    ``landmark_fraction`` within ``landmark_radius_km`` of a landmark, the others a few km from a sampled
    MP16 coordinate."""
    n_landmarks = len(landmark_latlon)
    shows = rng.random(n) < landmark_fraction if n_landmarks else np.zeros(n, bool)
    landmark = np.full(n, -1, np.int64)
    n_shown = int(shows.sum())
    if training:
        # Every landmark gets at least two training photos (when there are enough), so each test photo of
        # a landmark has matches to retrieve.
        base = np.tile(np.arange(n_landmarks), 2)[:n_shown]
        extra = rng.integers(0, n_landmarks, size=n_shown - len(base))
        landmark[shows] = rng.permutation(np.concatenate([base, extra]))
    else:
        landmark[shows] = rng.integers(0, n_landmarks, size=n_shown)
    latlon = coords[rng.integers(0, len(coords), size=n)]
    latlon = destination_deg(latlon, np.abs(rng.normal(0, 3.0, size=n)), rng.uniform(0, 2 * np.pi, size=n))
    radius = landmark_radius_km * np.sqrt(rng.random(n_shown))
    latlon[shows] = destination_deg(
        landmark_latlon[landmark[shows]], radius, rng.uniform(0, 2 * np.pi, n_shown)
    )
    return latlon, landmark


def _render_images(
    specs: list,
    seed: int,
    shape: Tuple[int, int],
    landmark_seeds: list,
    images_dir: Path,
    *,
    workers: int,
    progress: bool,
) -> None:
    """Render and write every photo of ``specs`` (64 to a job, in ``workers`` processes when more than one)."""
    chunks = [specs[i : i + 64] for i in range(0, len(specs), 64)]
    jobs = [(chunk, seed, shape, landmark_seeds, str(images_dir)) for chunk in chunks]
    bar = tqdm(total=len(specs), desc="synth images", unit="img", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for done in pool.map(_render_chunk, jobs):
                bar.update(done)
    else:
        for job in jobs:
            bar.update(_render_chunk(job))
    bar.close()


def _write_tables(out: Path, frames: List[pd.DataFrame], landmark_latlon: np.ndarray) -> None:
    """``train.csv`` and ``test.csv`` (MP16 columns), ``landmarks.csv`` and ``photo_landmarks.csv``."""
    for name, frame in zip(("train.csv", "test.csv"), frames):
        frame[["IMG_ID", "AUTHOR", "LAT", "LON"]].to_csv(out / name, index=False, float_format="%.6f")
    pd.DataFrame(
        {
            "LANDMARK": np.arange(len(landmark_latlon)),
            "LAT": landmark_latlon[:, 0],
            "LON": landmark_latlon[:, 1],
        }
    ).to_csv(out / "landmarks.csv", index=False, float_format="%.6f")
    pd.concat(
        [f.assign(SPLIT=s)[["SPLIT", "IMG_ID", "LANDMARK"]] for s, f in zip(("train", "test"), frames)]
    ).to_csv(out / "photo_landmarks.csv", index=False)
