"""The offline basemap: our TopoJSON decoder against topojson-client, geography known by hand, and the drawing."""

import json
import math

import numpy as np
import pytest

from geoswc.data import basemap

R_KM = 6371.0


@pytest.fixture(scope="module")
def reference(test_data):
    # What topojson-client@3.1.0 (the decoder the browser uses) makes of the same file; see tests/data/README.md.
    return json.loads((test_data / "basemap_topojson_client.json").read_text())


def _by_iso(iso):
    return next(rings for _, code, rings in basemap.countries() if code == iso)


def _reference_rings(geometry):
    polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    return [np.asarray(ring, dtype=float) for polygon in polygons for ring in polygon]


def _equal_area_km2(ring):
    """Area on the sphere of a lon/lat ring, by the shoelace formula in Lambert's cylindrical equal-area
    projection (x = lon in radians, y = sin(lat)), times R^2."""
    x, y = np.radians(ring[:, 0]), np.sin(np.radians(ring[:, 1]))
    return abs(0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) * R_KM**2


def test_country_rings_match_topojson_client(reference):
    assert len(basemap.countries()) == reference["n_countries"] == 241
    for iso, expected in reference["countries"].items():
        name, rings = next((n, r) for n, code, r in basemap.countries() if code == iso)
        assert name == expected["name"]
        ref_rings = _reference_rings(expected["geometry"])
        assert len(rings) == len(ref_rings)
        for ours, theirs in zip(rings, ref_rings):
            assert ours.shape == theirs.shape
            # Our rings are continuous across the antimeridian (Fiji), the reference jumps: compare modulo 360.
            dlon = (ours[:, 0] - theirs[:, 0] + 180.0) % 360.0 - 180.0
            np.testing.assert_allclose(dlon, 0.0, atol=1e-9)
            np.testing.assert_allclose(ours[:, 1], theirs[:, 1], atol=1e-9)
            assert np.abs(np.diff(ours[:, 0])).max() <= 180.0


def test_land_and_borders_match_topojson_client(reference):
    land = basemap.land()
    assert len(land) == reference["land"]["polygons"]
    assert sum(len(p) for p in land) == reference["land"]["rings"]
    length_deg = sum(np.hypot(*np.diff(line, axis=0).T).sum() for line in basemap.border_lines())
    assert length_deg == pytest.approx(reference["mesh"]["length_deg"], rel=1e-9)


def test_places_fall_in_their_country():
    from matplotlib.path import Path

    def inside(iso, lon, lat):
        # Rings that cross the antimeridian run past 180: a place at -174 may be at 186 on them.
        return any(Path(ring).contains_point((x, lat)) for ring in _by_iso(iso) for x in (lon, lon + 360.0))

    assert inside("250", 2.35, 48.86)  # Paris, France
    assert inside("724", -3.70, 40.42)  # Madrid, Spain
    assert inside("036", 149.13, -35.28)  # Canberra, Australia
    assert inside("643", 175.0, 67.0)  # Chukotka, Russia, west of 180 ...
    assert inside("643", -174.0, 66.0)  # ... and east of it, on the same ring
    assert inside("242", 178.0, -17.8)  # Viti Levu, Fiji
    assert not inside("250", -3.70, 40.42)
    # Null Island is sea.
    assert not any(
        Path(ring).contains_point((0.0, 0.0)) for _, _, rings in basemap.countries() for ring in rings
    )


def test_areas_are_those_of_the_atlas():
    # Known areas (km^2): Australia 7.69 million, France's metropolitan territory 0.55 million (the Natural
    # Earth "France" also holds French Guiana, 84,000 km^2, and the overseas departments).
    australia = sum(_equal_area_km2(r) for r in _by_iso("036"))
    assert australia == pytest.approx(7.69e6, rel=0.03)
    lesotho = _by_iso("426")
    assert len(lesotho) == 1 and _equal_area_km2(lesotho[0]) == pytest.approx(30_355, rel=0.05)
    # Lesotho is a hole in South Africa: its ring appears in both.
    south_africa = _by_iso("710")
    assert any(
        len(r) == len(lesotho[0]) and np.allclose(np.sort(r, 0), np.sort(lesotho[0], 0)) for r in south_africa
    )


def test_antarctica_is_closed_along_the_pole():
    rings = _by_iso("010")
    exterior = max(rings, key=len)
    assert exterior[:, 1].min() == -90.0
    # The unwrapped ring goes once round the pole: its longitudes span a full turn.
    assert exterior[:, 0].max() - exterior[:, 0].min() == pytest.approx(360.0, abs=1.0)
    # Antarctica is 14.2 million km^2 with its ice shelves, about 12.3 million without; closed along the
    # wrong pole the ring would hold the rest of the sphere (498 million).
    assert 11.5e6 < _equal_area_km2(exterior) < 14.5e6


def test_draw_paints_land_and_sea():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=100)
    fig.subplots_adjust(0, 0, 1, 1)
    basemap.draw(ax, land="#00ff00", borders="none", coast="none", ocean="#0000ff")
    assert (ax.get_xlim(), ax.get_ylim()) == ((-180.0, 180.0), (-90.0, 90.0))
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[:, :, :3]
    plt.close(fig)

    def colour(lon, lat):
        col = int((lon + 180.0) / 360.0 * (pixels.shape[1] - 1))
        row = int((90.0 - lat) / 180.0 * (pixels.shape[0] - 1))
        return tuple(int(v) for v in pixels[row, col])

    for lon, lat in [(2.35, 48.86), (20.0, 0.0), (-100.0, 40.0), (135.0, -25.0), (0.0, -85.0), (100.0, 60.0)]:
        assert colour(lon, lat) == (0, 255, 0), (lon, lat)
    # Atlantic, Pacific, Indian Ocean, and the Caspian Sea (a hole in the land).
    for lon, lat in [(-30.0, 30.0), (-150.0, 0.0), (80.0, -20.0), (50.5, 42.0)]:
        assert colour(lon, lat) == (0, 0, 255), (lon, lat)


def test_draw_keeps_the_axes_limits_and_rejects_bad_extents():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0.0, 10.0], [40.0, 50.0])
    before = (ax.get_xlim(), ax.get_ylim())
    basemap.draw(ax)
    assert (ax.get_xlim(), ax.get_ylim()) == before
    basemap.draw(ax, extent=(-10, 30, 35, 60))
    assert (ax.get_xlim(), ax.get_ylim()) == ((-10.0, 30.0), (35.0, 60.0))
    with pytest.raises(ValueError, match="lon_min"):
        basemap.draw(ax, extent=(30, -10, 35, 60))
    plt.close(fig)


def test_topology_json_is_the_packaged_file():
    topo = json.loads(basemap.topology_json())
    assert topo["type"] == "Topology" and set(topo["objects"]) == {"countries", "land"}
    assert math.isclose(topo["transform"]["translate"][0], -180.0)
