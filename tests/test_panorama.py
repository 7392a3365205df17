"""`geoswc data panorama`: equirectangular panoramas cut into gnomonic views (`geoswc.data.gnomonic`,
`geoswc.data.panorama`).

Scenes are rendered here from the documented convention alone (pixel centres at ``+ 0.5``; azimuth
``(u / W - 1/2) * 360`` clockwise, elevation ``(1/2 - v / H) * 180``): a cube room whose edges must stay straight
in every view, coloured poles at known compass headings and a horizon line, and a smooth scene the views are
compared with pixel by pixel. The projection is checked against hand computations and against the forward
gnomonic equations of the thesis (``002_…``, section 3.4).
"""

from __future__ import annotations

import csv
import math
import tracemalloc
from pathlib import Path

import numpy as np
import piexif
import pytest
from PIL import Image

from geoswc.cli import main
from geoswc.data.images import encode_jpeg
from geoswc.data.gnomonic import render_view, sample_bilinear, view_to_panorama
from geoswc.data.panorama import cut_panoramas, xmp_heading
from geoswc.data.utm import latlon_to_utm
from geoswc.data.vpr import format_name, parse_name, read_split

PANO_H, PANO_W = 512, 1024


def pano_directions(height: int, width: int) -> np.ndarray:
    """Unit vectors ``(H, W, 3)`` of the panorama's pixel centres: x right of azimuth 0, y along it, z up."""
    az = ((np.arange(width) + 0.5) / width - 0.5) * 2 * np.pi
    el = (0.5 - (np.arange(height) + 0.5) / height) * np.pi
    el, az = np.meshgrid(el, az, indexing="ij")
    return np.stack([np.sin(az) * np.cos(el), np.cos(az) * np.cos(el), np.sin(el)], axis=-1)


def camera_rays(size, fov_deg, azimuth_deg, pitch_deg):
    """Rays of a view's pixel centres, written out from the definition of a pinhole camera."""
    h, w = size
    f = (w / 2) / math.tan(math.radians(fov_deg / 2))
    a, t = math.radians(azimuth_deg), math.radians(pitch_deg)
    forward = np.array([math.sin(a) * math.cos(t), math.cos(a) * math.cos(t), math.sin(t)])
    right = np.array([math.cos(a), -math.sin(a), 0.0])
    up = np.cross(right, forward)
    y, x = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    rays = forward * f + ((x - w / 2)[..., None] * right) + ((h / 2 - y)[..., None] * up)
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


# --- the projection --------------------------------------------------------------------------------------


def test_view_pixel_to_panorama_pixel_by_hand():
    # A 200 x 100 view with a 90-degree field of view has f = 100 px; the panorama is 3600 x 1800 (10 px/deg).
    common = dict(view_size=(100, 200), fov_deg=90.0, pano_size=(1800, 3600))
    # Right edge, middle row, looking at azimuth 90: 45 degrees further right, on the horizon.
    u, v = view_to_panorama(np.array(200.0), np.array(50.0), azimuth_deg=90.0, **common)
    assert (float(u), float(v)) == pytest.approx((1800 + 1350, 900), abs=1e-9)
    # Top right corner looking at azimuth 0: the ray (100, 100, 50) -> azimuth 45, elevation atan(50 / 141.42).
    u, v = view_to_panorama(np.array(200.0), np.array(0.0), azimuth_deg=0.0, **common)
    elevation = math.degrees(math.atan(50 / math.hypot(100, 100)))
    assert (float(u), float(v)) == pytest.approx((1800 + 450, 900 - 10 * elevation), abs=1e-9)
    assert elevation == pytest.approx(19.4712, abs=1e-4)
    # Pitch 30: the top middle of the view is 30 + atan(0.5) up; the right middle is the ray
    # forward + right = (1, cos 30, sin 30): azimuth atan2(1, cos 30), elevation atan2(sin 30, |(1, cos 30)|).
    u, v = view_to_panorama(np.array(100.0), np.array(0.0), azimuth_deg=0.0, pitch_deg=30.0, **common)
    assert (float(u), float(v)) == pytest.approx((1800, 900 - 10 * (30 + math.degrees(math.atan(0.5)))))
    u, v = view_to_panorama(np.array(200.0), np.array(50.0), azimuth_deg=0.0, pitch_deg=30.0, **common)
    c30, s30 = math.cos(math.radians(30)), math.sin(math.radians(30))
    az = math.degrees(math.atan2(1, c30))
    el = math.degrees(math.atan2(s30, math.hypot(1, c30)))
    assert (float(u), float(v)) == pytest.approx((1800 + 10 * az, 900 - 10 * el), abs=1e-9)
    # Looking back (azimuth 180), the view's centre column reads the seam: u is 0 (= W), never outside [0, W).
    u, v = view_to_panorama(np.array([99.0, 100.0, 101.0]), np.array([50.0] * 3), azimuth_deg=180.0, **common)
    assert np.all((u >= 0) & (u < 3600))
    assert u[0] == pytest.approx(3600 - 10 * math.degrees(math.atan(0.01)))
    assert u[1] == pytest.approx(0.0, abs=1e-9) or u[1] == pytest.approx(3600.0)
    assert u[2] == pytest.approx(10 * math.degrees(math.atan(0.01)))


@pytest.mark.parametrize("azimuth, pitch", [(0.0, 0.0), (137.0, 20.0), (-60.0, -35.0), (180.0, 50.0)])
def test_projection_inverts_the_thesis_forward_gnomonic_equations(azimuth, pitch):
    """Thesis 002, section 3.4: x = cos(phi) sin(lam - lam0) / cos c, y = (cos phi1 sin phi - sin phi1 cos phi
    cos(lam - lam0)) / cos c, cos c = sin phi1 sin phi + cos phi1 cos phi cos(lam - lam0). Our view pixel ->
    panorama position, read back as (lam, phi) and pushed through them, lands on the same tangent-plane point."""
    rng = np.random.default_rng(0)
    h, w, fov, pano = 300, 400, 70.0, (2000, 4000)
    x, y = rng.uniform(0, w, 500), rng.uniform(0, h, 500)
    u, v = view_to_panorama(
        x, y, view_size=(h, w), fov_deg=fov, azimuth_deg=azimuth, pitch_deg=pitch, pano_size=pano
    )
    lam = np.radians((u / pano[1] - 0.5) * 360)
    phi = np.radians((0.5 - v / pano[0]) * 180)
    lam0, phi1 = math.radians(azimuth), math.radians(pitch)
    cos_c = math.sin(phi1) * np.sin(phi) + math.cos(phi1) * np.cos(phi) * np.cos(lam - lam0)
    gx = np.cos(phi) * np.sin(lam - lam0) / cos_c
    gy = (math.cos(phi1) * np.sin(phi) - math.sin(phi1) * np.cos(phi) * np.cos(lam - lam0)) / cos_c
    f = (w / 2) / math.tan(math.radians(fov / 2))
    np.testing.assert_allclose(gx * f, x - w / 2, atol=1e-6)
    np.testing.assert_allclose(gy * f, h / 2 - y, atol=1e-6)


def test_bilinear_sampling_by_hand_wraps_the_seam_and_crosses_the_poles():
    pano = np.arange(4 * 8, dtype=np.uint8).reshape(4, 8, 1) * 7  # pixel (r, c) holds 7 (8 r + c)

    def value(r: int, c: int) -> float:
        return 7.0 * (8 * r + c)

    u = np.array([2.5, 3.0, 0.25, 7.75, 2.5, 2.5, 6.0])
    v = np.array([1.5, 1.5, 1.5, 2.5, 0.25, 3.75, 4.0])
    expected = [
        value(1, 2),  # a pixel centre is the pixel
        (value(1, 2) + value(1, 3)) / 2,  # between two centres, their mean
        0.25 * value(1, 7) + 0.75 * value(1, 0),  # left of the first centre: the last column, across the seam
        0.75 * value(2, 7) + 0.25 * value(2, 0),
        0.75 * value(0, 2) + 0.25 * value(0, 6),  # above the first row's centre: that row half a turn around
        0.75 * value(3, 2) + 0.25 * value(3, 6),  # below the last row's centre: the same at the bottom
        (value(3, 5) + value(3, 6) + value(3, 1) + value(3, 2)) / 4,  # on the south pole itself
    ]
    np.testing.assert_allclose(sample_bilinear(pano, u, v)[:, 0], expected, rtol=1e-6)


# --- scenes ----------------------------------------------------------------------------------------------

FACE_COLOURS = np.array(
    [[230, 30, 30], [30, 200, 30], [30, 30, 230], [230, 220, 30], [220, 30, 220], [30, 210, 220]], float
)


def cube_room(height: int, width: int, rotation: np.ndarray) -> np.ndarray:
    """The panorama of a camera inside a cube room (rotated), each of the six walls in its own colour."""
    d = pano_directions(height, width) @ rotation.T
    axis = np.abs(d).argmax(-1)
    sign = np.take_along_axis(d, axis[..., None], -1)[..., 0] > 0
    return FACE_COLOURS[axis * 2 + sign].astype(np.uint8)


def _rotation(yaw_deg: float, tilt_deg: float) -> np.ndarray:
    a, b = math.radians(yaw_deg), math.radians(tilt_deg)
    yaw = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tilt @ yaw


def wall_edges(image: np.ndarray) -> dict:
    """Boundary points between walls, per pair of walls: the midpoint between two neighbouring pixels (side by
    side, or with one blended pixel between them) that clearly show different walls."""
    dist = ((image[:, :, None, :].astype(float) - FACE_COLOURS[None, None]) ** 2).sum(-1)
    label = dist.argmin(-1)
    label[dist.min(-1) > 40.0**2] = -1  # blended pixels on the boundary belong to neither wall
    points: dict = {}
    for axis in (0, 1):
        lab = label if axis == 1 else label.T
        for gap in (1, 2):
            a, b = lab[:, :-gap], lab[:, gap:]
            middle_ok = np.ones_like(a, dtype=bool) if gap == 1 else lab[:, 1:-1] == -1
            rows, cols = np.nonzero((a >= 0) & (b >= 0) & (a != b) & middle_ok)
            for r, c in zip(rows, cols):
                key = tuple(sorted((int(a[r, c]), int(b[r, c]))))
                along = c + 0.5 + gap / 2
                xy = (along, r + 0.5) if axis == 1 else (r + 0.5, along)
                points.setdefault(key, []).append(xy)
    return {k: np.array(v) for k, v in points.items() if len(v) >= 40}


def line_residuals(points: np.ndarray) -> np.ndarray:
    """Perpendicular distances of points to their total-least-squares line."""
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[1]


def test_cube_room_edges_stay_straight_in_every_view():
    pano = cube_room(PANO_H * 2, PANO_W * 2, _rotation(25.0, 15.0))
    worst, edges = 0.0, 0
    for azimuth in range(0, 360, 45):
        for pitch in (0.0, 25.0, -40.0):
            view = render_view(pano, azimuth_deg=azimuth, pitch_deg=pitch, fov_deg=75.0, size=(240, 320))
            for points in wall_edges(view).values():
                residual = line_residuals(points)
                assert np.sqrt((residual**2).mean()) < 0.4
                worst = max(worst, float(np.abs(residual).max()))
                edges += 1
    assert edges >= 30
    assert worst < 1.0
    # The same measure sees the curvature of those edges in the panorama itself (so it can fail).
    bent = [np.abs(line_residuals(p)).max() for p in wall_edges(pano[PANO_H // 2 : PANO_H * 3 // 2]).values()]
    assert max(bent) > 5.0


def poles_and_horizon(height: int, width: int, poles: dict) -> np.ndarray:
    """Grey panorama, a black horizon band (|elevation| < 0.6 deg) and vertical poles (|azimuth - a| < 1.5 deg)
    in given colours at given panorama azimuths."""
    image = np.full((height, width, 3), 128, np.uint8)
    el = (0.5 - (np.arange(height) + 0.5) / height) * 180
    az = ((np.arange(width) + 0.5) / width - 0.5) * 360
    image[np.abs(el) < 0.6] = 0
    for azimuth, colour in poles.items():
        off = (az - azimuth + 180) % 360 - 180
        image[:, np.abs(off) < 1.5] = colour
    return image


def _column_centre(view: np.ndarray, colour) -> float:
    mask = (np.abs(view.astype(int) - np.array(colour)).sum(-1) < 60).astype(float)
    weight = mask.sum(0)
    assert weight.sum() > 0
    return float((weight * (np.arange(view.shape[1]) + 0.5)).sum() / weight.sum())


def _write_jpeg(path: Path, image: np.ndarray, exif: bytes = b"") -> Path:
    Image.fromarray(image).save(path, quality=95, exif=exif)
    return path


GPANO_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:GPano="http://ns.google.com/photos/1.0/panorama/" GPano:ProjectionType='
    '"equirectangular" GPano:PoseHeadingDegrees="{heading}"/></rdf:RDF></x:xmpmeta>'
)


def test_xmp_heading_reads_gpano_attributes_and_elements():
    assert xmp_heading(GPANO_XMP.format(heading=-12.5).encode()) == -12.5
    assert xmp_heading("<GPano:PoseHeadingDegrees> 271.0 </GPano:PoseHeadingDegrees>") == 271.0
    assert xmp_heading(GPANO_XMP.format(heading="north")) is None
    assert xmp_heading(GPANO_XMP.format(heading="1e9")) is None
    assert xmp_heading(b"") is None and xmp_heading(None) is None


@pytest.mark.parametrize("given_by", ["csv", "xmp"])
def test_views_look_along_their_headings(tmp_path, given_by):
    """A panorama whose centre column looks along compass heading 30 (given in the CSV, or in its XMP as
    GPano:PoseHeadingDegrees): a red pole at compass 90 (panorama azimuth 60) sits in the middle of the view
    named heading 90; a blue pole at compass 200 sits f tan(20) right of the middle of the view named 180; the
    horizon is the middle row."""
    from PIL.PngImagePlugin import PngInfo

    heading = 30.0
    pano = poles_and_horizon(1024, 2048, {90 - heading: (230, 0, 0), 200 - heading: (0, 0, 230)})
    folder = tmp_path / "panos"
    folder.mkdir()
    info = PngInfo()
    if given_by == "xmp":
        info.add_itxt("XML:com.adobe.xmp", GPANO_XMP.format(heading=heading))
        (tmp_path / "where.csv").write_text("file,lat,lon\nstreet.png,45.0700,7.6860\n")
    else:
        (tmp_path / "where.csv").write_text(f"file,lat,lon,heading\nstreet.png,45.0700,7.6860,{heading}\n")
    Image.fromarray(pano).save(folder / "street.png", pnginfo=info)  # lossless, so the colours are exact
    size, fov = (180, 240), 60.0
    cut_panoramas(
        [folder], tmp_path / "out", views=4, fov_deg=fov, size=size, positions_csv=tmp_path / "where.csv"
    )
    views = {}
    for path in (tmp_path / "out" / "images" / "test" / "database").iterdir():
        fields = parse_name(path.name).extra
        views[float(fields[2])] = np.asarray(Image.open(path).convert("RGB"))
    assert sorted(views) == [0.0, 90.0, 180.0, 270.0]
    f = (size[1] / 2) / math.tan(math.radians(fov / 2))
    assert _column_centre(views[90.0], (230, 0, 0)) == pytest.approx(size[1] / 2, abs=0.5)
    assert _column_centre(views[180.0], (0, 0, 230)) == pytest.approx(
        size[1] / 2 + f * math.tan(math.radians(20)), abs=0.5
    )
    for heading_seen, view in views.items():
        dark = (view.astype(int).sum(-1) < 120) & (np.abs(view.astype(int) - [230, 0, 0]).sum(-1) > 60)
        dark &= np.abs(view.astype(int) - [0, 0, 230]).sum(-1) > 60
        rows = np.nonzero(dark.any(1))[0]
        assert rows.size and (rows.min() + rows.max() + 1) / 2 == pytest.approx(size[0] / 2, abs=1.0), (
            heading_seen
        )


def test_horizon_is_a_straight_row_under_pitch():
    """Looking up by 10 degrees, the horizon is the straight row f tan(10) below the middle."""
    pano = poles_and_horizon(1024, 2048, {})
    size, fov, pitch = (240, 320), 60.0, 10.0
    view = render_view(pano, azimuth_deg=77.0, pitch_deg=pitch, fov_deg=fov, size=size)
    dark = 128.0 - view[..., 0].astype(float)
    rows = (np.arange(size[0]) + 0.5)[:, None]
    centre = (dark * rows).sum(0) / dark.sum(0)
    f = (size[1] / 2) / math.tan(math.radians(fov / 2))
    np.testing.assert_allclose(centre, size[0] / 2 + f * math.tan(math.radians(pitch)), atol=0.3)


def smooth_scene(height: int, width: int) -> np.ndarray:
    """Colours that vary smoothly but quickly with direction (several cycles around the sphere)."""
    d = pano_directions(height, width)
    return _smooth_colour(d)


def _smooth_colour(d: np.ndarray) -> np.ndarray:
    return 128 + 110 * np.stack([np.sin(6 * d[..., 0]), np.sin(5 * d[..., 1] + 1), np.sin(7 * d[..., 2])], -1)


@pytest.mark.parametrize("azimuth, pitch", [(180.0, 0.0), (-179.0, 0.0), (40.0, 70.0), (200.0, -72.0)])
def test_views_match_the_scene_across_the_seam_and_the_poles(azimuth, pitch):
    """Every view pixel holds the scene's colour along its ray, also where the view straddles the seam (180)
    or reaches past a pole."""
    pano = np.clip(np.rint(smooth_scene(1024, 2048)), 0, 255).astype(np.uint8)
    size, fov = (120, 160), 60.0
    view = render_view(pano, azimuth_deg=azimuth, pitch_deg=pitch, fov_deg=fov, size=size).astype(float)
    expected = _smooth_colour(camera_rays(size, fov, azimuth, pitch))
    error = np.abs(view - expected)
    assert error.max() <= 1.25 and error.mean() <= 0.35


def test_seam_view_equals_the_same_view_of_the_panorama_turned_half_around():
    """Columns wrap: the view centred on the seam is the centred view of the panorama rolled by W/2."""
    rng = np.random.default_rng(1)
    pano = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    seam = render_view(pano, azimuth_deg=180.0, fov_deg=60.0, size=(90, 120))
    centred = render_view(np.roll(pano, 256, axis=1), azimuth_deg=0.0, fov_deg=60.0, size=(90, 120))
    assert np.abs(seam.astype(int) - centred.astype(int)).max() <= 1


def test_a_view_of_a_large_panorama_costs_a_few_megabytes():
    pano = np.zeros((4096, 8192, 3), np.uint8)
    tracemalloc.start()
    try:
        render_view(pano, azimuth_deg=10.0, fov_deg=60.0, size=(480, 640))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20


# --- the command -----------------------------------------------------------------------------------------


def _gps_exif(lat: float, lon: float) -> bytes:
    def dms(value: float):
        value = abs(value)
        d = int(value)
        m = int((value - d) * 60)
        s = round(((value - d) * 60 - m) * 60 * 10000)
        return ((d, 1), (m, 1), (s, 10000))

    gps = {
        piexif.GPSIFD.GPSLatitudeRef: b"N" if lat >= 0 else b"S",
        piexif.GPSIFD.GPSLatitude: dms(lat),
        piexif.GPSIFD.GPSLongitudeRef: b"E" if lon >= 0 else b"W",
        piexif.GPSIFD.GPSLongitude: dms(lon),
    }
    return piexif.dump({"GPS": gps})


def test_command_names_parse_back_to_the_panoramas_positions(tmp_path, capsys):
    panos = tmp_path / "panos"
    (panos / "day1").mkdir(parents=True)
    scene = np.clip(np.rint(smooth_scene(128, 256)), 0, 255).astype(np.uint8)
    # From the CSV (by path below the folder given), from a name in the layout, and from EXIF GPS.
    _write_jpeg(panos / "day1" / "a.jpg", scene)
    east, north, zone, letter = latlon_to_utm(45.06, 7.69)
    named = format_name(float(east), float(north), zone=zone, letter=letter, lat=45.06, lon=7.69, pano="P42")
    _write_jpeg(panos / named, scene)
    _write_jpeg(panos / "c.jpg", scene, exif=_gps_exif(-33.8688, 151.2093))
    (tmp_path / "where.csv").write_text("file,lat,lon\nday1/a.jpg,40.7128,-74.0060\n")
    code = main(
        [
            "data",
            "panorama",
            str(panos),
            "-o",
            str(tmp_path / "vpr"),
            "--views",
            "3",
            "--fov",
            "90",
            "--size",
            "30",
            "40",
            "--csv",
            str(tmp_path / "where.csv"),
        ]
    )
    assert code == 0
    assert "cut 3 panoramas into 9 views" in capsys.readouterr().out
    folder = tmp_path / "vpr" / "images" / "test" / "database"
    truth = {"day1_a": (40.7128, -74.0060), "P42": (45.06, 7.69), "c": (-33.8688, 151.2093)}
    seen = {}
    for path in sorted(folder.iterdir()):
        name = parse_name(path.name)
        pano, tile, heading, pitch = name.extra[:4]
        lat, lon = truth[pano]
        assert (name.lat, name.lon) == pytest.approx((lat, lon), abs=6e-6)
        e, n, z, band = latlon_to_utm(lat, lon)
        assert (name.zone, name.letter) == (z, band)
        assert (name.utm_east, name.utm_north) == pytest.approx((float(e), float(n)), abs=0.006)
        assert float(heading) == 120.0 * int(tile) and float(pitch) == 0.0
        assert Image.open(path).size == (40, 30)
        seen.setdefault(pano, set()).add(int(tile))
    assert seen == {p: {0, 1, 2} for p in truth}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    # Queries from another panorama added beside the database: the split reads as a whole.
    query = tmp_path / "query"
    query.mkdir()
    _write_jpeg(query / "q.jpg", scene, exif=_gps_exif(45.06001, 7.69001))
    assert (
        main(
            [
                "data",
                "panorama",
                str(query),
                "-o",
                str(tmp_path / "vpr"),
                "--part",
                "queries",
                "--views",
                "2",
                "--size",
                "30",
                "40",
            ]
        )
        == 0
    )
    split = read_split(tmp_path / "vpr", "test")
    assert len(split.database) == 9 and len(split.queries) == 2
    assert all(len(p) == 3 for p in split.positives())  # the three views of the panorama P42, 1.4 m away


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_not_two_to_one_is_refused_naming_the_file(tmp_path, capsys):
    panos = tmp_path / "panos"
    panos.mkdir()
    _write_jpeg(panos / "wide.jpg", np.zeros((200, 404, 3), np.uint8))
    err = _refused(["data", "panorama", str(panos / "wide.jpg"), "-o", str(tmp_path / "out")], capsys)
    assert "wide.jpg" in err and "404x200" in err and "twice the height" in err
    assert not (tmp_path / "out").exists()
    # A pixel off is still a panorama.
    _write_jpeg(panos / "almost.jpg", np.zeros((200, 401, 3), np.uint8), exif=_gps_exif(45.0, 7.0))
    assert (
        main(
            [
                "data",
                "panorama",
                str(panos / "almost.jpg"),
                "-o",
                str(tmp_path / "ok"),
                "--views",
                "1",
                "--size",
                "8",
                "8",
            ]
        )
        == 0
    )


def test_a_panorama_without_a_position_is_one_line_naming_it(tmp_path, capsys):
    panos = tmp_path / "panos"
    panos.mkdir()
    _write_jpeg(panos / "nowhere.jpg", np.zeros((64, 128, 3), np.uint8))
    err = _refused(["data", "panorama", str(panos), "-o", str(tmp_path / "out")], capsys)
    assert "nowhere.jpg" in err and "no position" in err and "--csv" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.csv").write_text("file,lat,lon\nnowhere.jpg,north,7\n")
    err = _refused(
        ["data", "panorama", str(panos), "-o", str(tmp_path / "out"), "--csv", str(tmp_path / "bad.csv")],
        capsys,
    )
    assert "bad.csv line 2" in err and "'north'" in err


def test_output_is_built_aside_never_through_a_link(tmp_path, capsys):
    panos = tmp_path / "panos"
    panos.mkdir()
    scene = np.zeros((64, 128, 3), np.uint8)
    _write_jpeg(panos / "a.jpg", scene, exif=_gps_exif(45.0, 7.0))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    err = _refused(["data", "panorama", str(panos), "-o", str(tmp_path / "link")], capsys)
    assert "symbolic link" in err and not any(elsewhere.iterdir())
    root = tmp_path / "root"
    (root / "images" / "test").mkdir(parents=True)
    (root / "images" / "test" / "database").symlink_to(elsewhere)
    err = _refused(["data", "panorama", str(panos), "-o", str(root)], capsys)
    assert "symbolic link" in err and not any(elsewhere.iterdir())
    (root / "images" / "test" / "database").unlink()
    (root / "images" / "test" / "database").mkdir()
    (root / "images" / "test" / "database" / "keep.jpg").write_bytes(b"x")
    err = _refused(["data", "panorama", str(panos), "-o", str(root)], capsys)
    assert "not empty" in err
    # A panorama that fails to decode half way leaves nothing behind: no folder, no temporary.
    good = encode_jpeg(scene)
    (panos / "b.jpg").write_bytes(good[: len(good) // 2])
    with open(tmp_path / "where.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["file", "lat", "lon"], ["b.jpg", "45.1", "7.1"]])
    err = _refused(
        [
            "data",
            "panorama",
            str(panos),
            "-o",
            str(tmp_path / "new" / "deeper"),
            "--csv",
            str(tmp_path / "where.csv"),
        ],
        capsys,
    )
    assert "b.jpg" in err
    assert not (tmp_path / "new").exists()


def test_bad_options_are_one_line(tmp_path, capsys):
    panos = tmp_path / "panos"
    panos.mkdir()
    _write_jpeg(panos / "a.jpg", np.zeros((64, 128, 3), np.uint8), exif=_gps_exif(45.0, 7.0))
    err = _refused(["data", "panorama", str(panos), "-o", str(tmp_path / "out"), "--fov", "180"], capsys)
    assert "fov" in err and "(0, 180)" in err
    err = _refused(["data", "panorama", str(panos), "-o", str(tmp_path / "out"), "--views", "0"], capsys)
    assert "views" in err
    err = _refused(["data", "panorama", str(panos), "-o", str(tmp_path / "out"), "--quality", "0"], capsys)
    assert "quality" in err and "1..100" in err
    assert not (tmp_path / "out").exists()
