"""A synthetic street world in the place-recognition layout (`geoswc.data.vpr`).

A city of straight streets, each lined on one side by a row of buildings. Every building takes one of a few
facade styles (wall and window colours, window grid, number of floors, a shop band), and the styles repeat all
over the city: no single building identifies a place, only the arrangement of neighbouring buildings does, as
on real streets where facades repeat. A camera at a position along a street sees the stretch of facade in
front of it (20 m wide by default).

- **Database** photos are taken every ``db_step_m`` metres along every street, in the same light, from the
  street's axis.
- **Queries** are taken at random positions with a different zoom (field of view), a small vertical shift,
  other light (brightness, contrast, colour cast), sensor noise, and occluders in front of the facade (parked
  cars, poles, trees).

Splits (train/val/test) are different streets in different districts of the city, so a model is never tested
on the streets it was trained or initialised on. Photos are named ``@UTM_east@UTM_north@zone@letter@lat@lon
@...@.jpg`` with the camera's position; streets lie in one UTM zone around a real city centre.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
from PIL import Image

from .images import encode_jpeg
from .utm import latlon_to_utm, utm_to_latlon
from .vpr import format_name

# Turin, Piazza Castello: any city works; the layout only needs a UTM zone.
CITY_LATLON = (45.0710, 7.6858)
PIXELS_PER_M = 8
FACADE_HEIGHT_M = 14.0
N_STYLES = 6


@dataclass
class StreetWorldSpec:
    """What `make_street_world` wrote (also saved as ``world.json`` beside ``images/``)."""

    seed: int
    streets: Dict[str, int]
    street_length_m: float
    db_step_m: float
    queries_per_street: int
    view_width_m: float
    image_width: int
    image_height: int
    zone: int
    letter: str
    styles: int
    counts: Dict[str, Dict[str, int]]


def _styles(rng: np.random.Generator, n: int) -> List[dict]:
    styles = []
    for _ in range(n):
        wall = rng.integers(60, 230, size=3)
        styles.append(
            {
                "wall": wall,
                "window": rng.integers(0, 256, size=3),
                "band": rng.integers(0, 256, size=3),
                "floors": int(rng.integers(2, 6)),
                "cols_per_10m": int(rng.integers(2, 6)),
                "window_fill": float(rng.uniform(0.3, 0.7)),
            }
        )
    return styles


def _render_street(rng: np.random.Generator, styles: List[dict], length_m: float) -> np.ndarray:
    """The facade strip of one street, ``(H, W, 3)`` uint8, with sky above and pavement below."""
    ppm = PIXELS_PER_M
    height = int(FACADE_HEIGHT_M * ppm)
    width = int(length_m * ppm)
    strip = np.empty((height, width, 3), np.float32)
    sky = np.linspace(1.0, 0.75, height)[:, None] * np.array([150, 190, 235], np.float32)
    strip[:] = sky[:, None, :]
    pavement = int(1.2 * ppm)
    strip[height - pavement :] = (110, 105, 100)
    x = 0
    floor_h = 3 * ppm
    while x < width:
        style = styles[int(rng.integers(len(styles)))]
        bw = int(rng.uniform(6, 14) * ppm)
        x1 = min(width, x + bw)
        top = height - pavement - style["floors"] * floor_h
        strip[top : height - pavement, x:x1] = style["wall"]
        band_top = height - pavement - int(1.0 * ppm)
        strip[band_top : height - pavement, x:x1] = style["band"]
        n_cols = max(1, round(style["cols_per_10m"] * (x1 - x) / (10 * ppm)))
        cell_w = (x1 - x) / n_cols
        win_w = max(2, int(cell_w * style["window_fill"]))
        win_h = int(floor_h * 0.5)
        for floor in range(style["floors"] - 1):
            y0 = top + floor * floor_h + int(floor_h * 0.25)
            for col in range(n_cols):
                cx = int(x + (col + 0.5) * cell_w)
                strip[y0 : y0 + win_h, cx - win_w // 2 : cx + (win_w + 1) // 2] = style["window"]
        strip[top : top + 2, x:x1] *= 0.6  # cornice
        strip[:, x : x + 1] *= 0.7  # the joint between two buildings
        x = x1
    return np.clip(strip, 0, 255).astype(np.uint8)


def _view(
    strip: np.ndarray, center_m: float, width_m: float, shift_px: int, size: Tuple[int, int]
) -> np.ndarray:
    """The stretch of ``strip`` a camera at ``center_m`` sees, resized to ``size`` (width, height)."""
    ppm = PIXELS_PER_M
    h, w = strip.shape[:2]
    half = width_m * ppm / 2
    x0, x1 = int(round(center_m * ppm - half)), int(round(center_m * ppm + half))
    crop_h = min(h, int(round((x1 - x0) * size[1] / size[0])))
    y1 = int(np.clip(h - (h - crop_h) // 3 + shift_px, crop_h, h))
    pad = np.pad(strip, ((0, 0), (max(0, -x0), max(0, x1 - w)), (0, 0)), mode="edge")
    crop = pad[y1 - crop_h : y1, x0 + max(0, -x0) : x1 + max(0, -x0)]
    return np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))


def _disturb(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light, colour cast, occluders and noise of a query photo."""
    out = image.astype(np.float32)
    h, w = out.shape[:2]
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(3)
        if kind == 0:  # a parked car along the bottom
            cw, ch = int(w * rng.uniform(0.2, 0.35)), int(h * rng.uniform(0.12, 0.22))
            cx = int(rng.integers(0, w - cw))
            out[h - ch - int(h * 0.03) : h - int(h * 0.03), cx : cx + cw] = rng.integers(0, 256, size=3)
        elif kind == 1:  # a pole
            pw = max(2, int(w * 0.02))
            px = int(rng.integers(0, w - pw))
            out[int(h * rng.uniform(0.0, 0.3)) :, px : px + pw] = (50, 50, 55)
        else:  # a tree crown on a trunk
            r = int(h * rng.uniform(0.12, 0.2))
            cx, cy = int(rng.integers(r, w - r)), int(h * rng.uniform(0.3, 0.5))
            yy, xx = np.ogrid[:h, :w]
            out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (40, 110 + rng.integers(40), 45)
            out[cy:, cx - 2 : cx + 2] = (80, 60, 40)
    gain = rng.uniform(0.6, 1.3)
    contrast = rng.uniform(0.75, 1.2)
    cast = rng.uniform(0.85, 1.15, size=3)
    out = ((out - 128.0) * contrast + 128.0) * gain * cast
    out += rng.normal(0, 4.0, size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _street_axes(split_index: int, street: int) -> Tuple[np.ndarray, np.ndarray]:
    """Start point (UTM offset from the centre, metres) and unit direction of a street: splits are districts
    2 km apart, streets of a district 150 m apart, alternately running east and north."""
    start = np.array([2000.0 * split_index, 150.0 * street])
    direction = np.array([1.0, 0.0]) if street % 2 == 0 else np.array([0.7071, 0.7071])
    return start, direction


def _write(path: Path, image: np.ndarray) -> None:
    path.write_bytes(encode_jpeg(image, quality=92))


def make_street_world(
    out_dir: Union[str, os.PathLike],
    *,
    streets: Dict[str, int] | None = None,
    street_length_m: float = 200.0,
    db_step_m: float = 10.0,
    queries_per_street: int = 8,
    view_width_m: float = 20.0,
    image_size: Tuple[int, int] = (128, 96),
    styles: int = N_STYLES,
    seed: int = 0,
) -> StreetWorldSpec:
    """Write a street world as ``OUT/images/{train,val,test}/{database,queries}/@...@.jpg``.

    Args:
        out_dir: a new or empty folder; the world is written beside it and moved in when complete.
        streets: streets per split (default train 3, val 1, test 2).
        street_length_m: length of every street.
        db_step_m: distance between consecutive database photos along a street.
        queries_per_street: query photos per street, at uniform random positions.
        view_width_m: the facade width a database photo shows.
        image_size: (width, height) of the photos.
        styles: facade styles of the city (every building takes one of them).
        seed: everything follows from it.
    """
    streets = dict(streets or {"train": 3, "val": 1, "test": 2})
    unknown = set(streets) - {"train", "val", "test"}
    if unknown:
        raise ValueError(f"unknown split {sorted(unknown)[0]!r}; choose among: train, val, test")
    if street_length_m < 2 * view_width_m or db_step_m <= 0 or queries_per_street < 0:
        raise ValueError(
            f"need street_length_m >= 2 x view_width_m ({2 * view_width_m:g}), db_step_m > 0 and "
            f"queries_per_street >= 0; got {street_length_m}, {db_step_m}, {queries_per_street}"
        )
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if int(styles) < 1:
        raise ValueError(f"need at least one facade style, got styles={styles}")
    palette = _styles(rng, int(styles))
    c_east, c_north, zone, letter = latlon_to_utm(*CITY_LATLON)
    size = (int(image_size[0]), int(image_size[1]))
    counts: Dict[str, Dict[str, int]] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split_index, split in enumerate(("train", "val", "test")):
            if not streets.get(split):
                continue
            folders = {p: tmp / "images" / split / p for p in ("database", "queries")}
            for folder in folders.values():
                folder.mkdir(parents=True)
            counts[split] = {"database": 0, "queries": 0}
            for street in range(int(streets[split])):
                strip = _render_street(rng, palette, street_length_m)
                start, direction = _street_axes(split_index, street)
                margin = view_width_m / 2
                shots = [
                    ("database", s, None)
                    for s in np.arange(margin, street_length_m - margin + 1e-6, db_step_m)
                ]
                shots += [
                    ("queries", float(s), rng)
                    for s in rng.uniform(margin, street_length_m - margin, size=int(queries_per_street))
                ]
                for part, s, query_rng in shots:
                    if query_rng is None:
                        image = _view(strip, s, view_width_m, 0, size)
                    else:
                        zoom = query_rng.uniform(0.75, 1.3)
                        shift = int(query_rng.integers(-6, 7))
                        image = _disturb(_view(strip, s, view_width_m * zoom, shift, size), query_rng)
                    east, north = (np.array([c_east, c_north]) + start + direction * s).tolist()
                    lat, lon = utm_to_latlon(east, north, zone, letter)
                    name = format_name(
                        east,
                        north,
                        zone=zone,
                        letter=letter,
                        lat=float(lat),
                        lon=float(lon),
                        note=f"s{street}{part[0]}{counts[split][part]:05d}",
                    )
                    _write(folders[part] / name, image)
                    counts[split][part] += 1
        spec = StreetWorldSpec(
            seed=int(seed),
            streets={k: int(v) for k, v in streets.items()},
            street_length_m=float(street_length_m),
            db_step_m=float(db_step_m),
            queries_per_street=int(queries_per_street),
            view_width_m=float(view_width_m),
            image_width=size[0],
            image_height=size[1],
            zone=int(zone),
            letter=str(letter),
            styles=int(styles),
            counts=counts,
        )
        (tmp / "world.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec
