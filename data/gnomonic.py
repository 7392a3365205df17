"""The gnomonic (rectilinear) projection of an equirectangular panorama: view pixel -> ray -> panorama pixel.

The thesis ``002_…`` (section 3.4) undistorts tiles of Street View panoramas with the gnomonic projection,
which maps great circles (every straight edge of the scene) to straight lines and shows less than a hemisphere
at a time. `geoswc.data.panorama` writes such views in the place-recognition layout.

Conventions (degrees throughout; a panorama's width W is twice its height H, within a pixel or so):

- Pixel coordinates are continuous: pixel (column c, row r) covers ``[c, c+1) x [r, r+1)``, its centre is
  ``(c + 0.5, r + 0.5)``.
- A panorama's **azimuth** ``a`` grows clockwise (to the right) with the column: ``u = W * (a / 360 + 1/2)``,
  so the centre column ``u = W/2`` looks along azimuth 0 and the left and right edges along 180 (the seam).
  Its **elevation** ``e`` (up positive) is ``v = H * (1/2 - e / 180)``: the top row is the zenith.
- A view looks along azimuth ``a0``, tilted by ``pitch`` (up positive, no roll). Its horizontal field of view
  is ``fov``; pixels are square, so the focal length is ``f = (w/2) / tan(fov/2)`` pixels and the vertical field
  of view follows from the view's size. View pixel ``(x, y)`` is the ray ``d + p r + q u`` with
  ``p = (x - w/2) / f`` and ``q = (h/2 - y) / f``, ``d`` the viewing direction, ``r`` its right and ``u`` its up.

Sampling is bilinear between the four nearest pixel centres, columns wrapping around the seam and rows
reflected across the poles (a ray just past the zenith reads the row below it, half a turn around). A view is
computed a block of rows at a time, so a view of an 8192 x 4096 panorama costs a few megabytes besides the
panorama.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

# |W - 2H| allowed: one pixel of height either way (a 8192 x 4095 panorama is still a panorama).
RATIO_TOLERANCE_PX = 2
# View pixels computed at once: about 40 bytes each of coordinates and weights, a few megabytes per block.
BLOCK_PIXELS = 1 << 17


def focal_px(width: int, fov_deg: float) -> float:
    """Focal length in pixels of a view ``width`` pixels wide with horizontal field of view ``fov_deg``."""
    return (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)


def _camera(azimuth_deg: float, pitch_deg: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forward, right and up unit vectors in the panorama's frame (x right of azimuth 0, y along it, z up)."""
    a, t = math.radians(azimuth_deg), math.radians(pitch_deg)
    forward = np.array([math.sin(a) * math.cos(t), math.cos(a) * math.cos(t), math.sin(t)])
    right = np.array([math.cos(a), -math.sin(a), 0.0])
    up = np.array([-math.sin(a) * math.sin(t), -math.cos(a) * math.sin(t), math.cos(t)])
    return forward, right, up


def _ray_components(x, y, view_size, fov_deg, azimuth_deg, pitch_deg) -> Tuple[np.ndarray, ...]:
    """The three components of the (unnormalised) rays ``d + p r + q u``, ``x`` and ``y`` broadcast."""
    height, width = view_size
    f = focal_px(width, fov_deg)
    forward, right, up = _camera(azimuth_deg, pitch_deg)
    p = (np.asarray(x, dtype=np.float64) - width / 2.0) / f
    q = (height / 2.0 - np.asarray(y, dtype=np.float64)) / f
    return tuple(forward[i] + p * right[i] + q * up[i] for i in range(3))


def view_rays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    view_size: Tuple[int, int],
    fov_deg: float,
    azimuth_deg: float,
    pitch_deg: float = 0.0,
) -> np.ndarray:
    """Unit rays ``(..., 3)`` in the panorama's frame of view positions ``(x, y)`` (continuous pixels).

    Args:
        x, y: column and row positions in the view (pixel centres at ``+ 0.5``), arrays that broadcast.
        view_size: ``(height, width)`` of the view in pixels.
        fov_deg: horizontal field of view.
        azimuth_deg: the view's direction in the panorama (its heading minus the panorama's heading).
        pitch_deg: upward tilt.
    """
    rays = np.stack(_ray_components(x, y, view_size, fov_deg, azimuth_deg, pitch_deg), axis=-1)
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


def _to_panorama(rx, ry, rz, pano_size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    height, width = pano_size
    azimuth = np.arctan2(rx, ry)
    elevation = np.arctan2(rz, np.hypot(rx, ry))
    u = np.mod(width * (azimuth / (2 * np.pi) + 0.5), width)
    v = height * (0.5 - elevation / np.pi)
    return u, v


def rays_to_panorama(rays: np.ndarray, pano_size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Panorama positions ``(u, v)`` (continuous pixels, ``u`` in ``[0, W)``) of rays ``(..., 3)``."""
    return _to_panorama(rays[..., 0], rays[..., 1], rays[..., 2], pano_size)


def view_to_panorama(
    x: np.ndarray,
    y: np.ndarray,
    *,
    view_size: Tuple[int, int],
    fov_deg: float,
    azimuth_deg: float,
    pitch_deg: float = 0.0,
    pano_size: Tuple[int, int],
) -> Tuple[np.ndarray, np.ndarray]:
    """Where view positions ``(x, y)`` (arrays that broadcast) read the panorama: ``(u, v)`` in continuous
    panorama pixels."""
    return _to_panorama(*_ray_components(x, y, view_size, fov_deg, azimuth_deg, pitch_deg), pano_size)


def sample_bilinear(pano: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples ``(..., C)`` float32 of an equirectangular ``(H, W, C)`` image at ``(u, v)``.

    Columns wrap around the seam; a row above the first or below the last is the row across the pole (half a
    turn around), which is where the sphere continues.
    """
    height, width = pano.shape[:2]
    flat = pano.reshape(height * width, -1)
    s = np.asarray(u, dtype=np.float64) - 0.5
    t = np.asarray(v, dtype=np.float64) - 0.5
    c0 = np.floor(s)
    r0 = np.floor(t)
    fs = (s - c0).astype(np.float32)[..., None]
    ft = (t - r0).astype(np.float32)[..., None]
    c0 = c0.astype(np.int64)
    r0 = r0.astype(np.int64)

    def rows(r: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        above, below = r < 0, r > height - 1
        shift = np.where(above | below, width // 2, 0)
        r = np.where(above, -1 - r, np.where(below, 2 * height - 1 - r, r))
        return np.clip(r, 0, height - 1), shift

    top, top_shift = rows(r0)
    bottom, bottom_shift = rows(r0 + 1)

    def pixel(r: np.ndarray, c: np.ndarray, shift: np.ndarray) -> np.ndarray:
        return flat[r * width + np.mod(c + shift, width)].astype(np.float32)

    upper = (1 - fs) * pixel(top, c0, top_shift) + fs * pixel(top, c0 + 1, top_shift)
    lower = (1 - fs) * pixel(bottom, c0, bottom_shift) + fs * pixel(bottom, c0 + 1, bottom_shift)
    return (1 - ft) * upper + ft * lower


def render_view(
    pano: np.ndarray,
    *,
    azimuth_deg: float,
    fov_deg: float,
    size: Tuple[int, int],
    pitch_deg: float = 0.0,
) -> np.ndarray:
    """The gnomonic view ``(h, w, C)`` uint8 of an equirectangular ``(H, W, C)`` uint8 panorama.

    Args:
        pano: the panorama, RGB (or any channel count).
        azimuth_deg: the view's direction in the panorama (0: its centre column).
        fov_deg: horizontal field of view, in (0, 180).
        size: ``(height, width)`` of the view.
        pitch_deg: upward tilt.
    """
    height, width = int(size[0]), int(size[1])
    pano = pano if pano.ndim == 3 else pano[..., None]
    out = np.empty((height, width, pano.shape[2]), dtype=np.uint8)
    columns = np.arange(width) + 0.5
    block = max(1, BLOCK_PIXELS // width)
    for start in range(0, height, block):
        stop = min(height, start + block)
        u, v = view_to_panorama(
            columns[None, :],
            (np.arange(start, stop) + 0.5)[:, None],
            view_size=(height, width),
            fov_deg=fov_deg,
            azimuth_deg=azimuth_deg,
            pitch_deg=pitch_deg,
            pano_size=pano.shape[:2],
        )
        out[start:stop] = np.clip(np.rint(sample_bilinear(pano, u, v)), 0, 255).astype(np.uint8)
    return out


def view_headings(views: int) -> List[float]:
    """The compass headings of ``views`` views spread evenly around, view 0 looking north."""
    return [360.0 * k / views for k in range(views)]


def check_equirectangular(width: int, height: int, name: object) -> None:
    """Raise a one-line ValueError naming ``name`` unless ``width`` is twice ``height`` (within a pixel)."""
    if height < 2 or abs(width - 2 * height) > RATIO_TOLERANCE_PX:
        raise ValueError(
            f"{name}: {width}x{height} is not an equirectangular panorama (width must be twice the height, "
            f"within {RATIO_TOLERANCE_PX} pixels: e.g. {2 * height}x{height})"
        )
