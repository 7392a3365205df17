"""`geoswc vpr index` / `locate`: a database indexed into a model folder places street photos at their first
match, the same first match `geoswc vpr evaluate` ranks with that folder."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from vpr_fixtures import make_tiny_world

from geoswc.cli import main
from geoswc.vpr.locate import PlaceLocator, largest_cluster


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    base = tmp_path_factory.mktemp("vpr")
    world = make_tiny_world(base / "w")
    model = base / "model"
    assert (
        main(["vpr", "index", str(world), "--preset", "tiny", "--pool", "gem", "-o", str(model), "--quiet"])
        == 0
    )
    return world, model


def test_largest_cluster_by_hand():
    utm = np.array([[0.0, 0.0], [100.0, 0.0], [105.0, 0.0], [300.0, 0.0], [110.0, 0.0]])
    assert list(largest_cluster(utm, 10.0)) == [1, 2, 4]
    assert list(largest_cluster(utm[:2], 10.0)) == [0]  # a tie goes to the first match


@pytest.mark.slow
def test_index_locate_and_evaluate_agree(indexed, tmp_path):
    world, model = indexed
    meta = json.loads((model / "vpr.json").read_text())
    assert meta["pool"] == "gem" and (model / "vpr_index" / "index.json").is_file()
    ev = tmp_path / "ev"
    assert main(["vpr", "evaluate", str(world), "--model", str(model), "-o", str(ev), "--quiet"]) == 0
    first = {}
    with (ev / "predictions.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["rank"] == "1":
                first[row["query"]] = row["database"]
    split = world / "images" / "test"
    locator = PlaceLocator.from_pretrained(model)
    queries = sorted(first)
    records = locator.locate([split / q for q in queries], matches=3)
    assert [r["matches"][0]["path"] for r in records] == [first[q] for q in queries]
    photos = pd.read_csv(model / "photos.csv").set_index("path")
    for r in records:
        assert (r["lat"], r["lon"]) == pytest.approx(
            tuple(photos.loc[r["matches"][0]["path"], ["lat", "lon"]])
        )

    # The area filter: only the photos of the first street's bounding box can match.
    street0 = photos[photos.index.str.contains("@s0d")]
    box = [street0.lat.min(), street0.lon.min(), street0.lat.max(), street0.lon.max()]
    inside = locator.locate([split / q for q in queries], area=box, matches=5)
    assert all("@s0d" in m["path"] for r in inside for m in r["matches"])

    # Clustering the first 5 matches with eps 25 m lands near the first match's street.
    clustered = locator.locate([split / queries[0]], k=5, eps_m=25.0)[0]
    assert "cluster of the first 5 matches" in clustered["method"]

    out = tmp_path / "located.csv"
    assert main(["vpr", "locate", str(model), str(split / "queries"), "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(queries) and all(r["method"] == "first match" for r in rows)


def test_index_a_plain_folder_with_csv(indexed, tmp_path, capsys):
    world, _ = indexed
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    for i, src in enumerate(sorted((world / "images/test/database").iterdir())[:6]):
        shutil.copy(src, photos / f"p{i}.jpg")
        fields = src.name.split("@")
        rows.append({"IMG_ID": f"p{i}.jpg", "LAT": float(fields[5]), "LON": float(fields[6])})
    pd.DataFrame(rows).to_csv(tmp_path / "where.csv", index=False)
    model = tmp_path / "m"
    args = ["vpr", "index", str(photos), "--csv", str(tmp_path / "where.csv"), "--preset", "tiny", "--quiet"]
    assert main(args + ["-o", str(model)]) == 0
    record = PlaceLocator.from_pretrained(model).locate([photos / "p3.jpg"])[0]
    assert record["matches"][0]["path"] == "p3.jpg"  # a database photo finds itself
    assert (record["lat"], record["lon"]) == pytest.approx((rows[3]["LAT"], rows[3]["LON"]))

    assert main(["vpr", "index", str(photos), "--preset", "tiny", "-o", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neither the place-recognition layout" in err and "--csv" in err
    assert not (tmp_path / "m2").exists()
