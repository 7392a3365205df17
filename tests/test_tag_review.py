"""Reviewable tag output: alternatives, evidence, place names, abstentions, EXIF GPS, kept embeddings and the
review page, checked against the model run on each photo alone, a brute-force gazetteer search and
hand-computed distances."""

import csv
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from geoswc.tagging.exif_copies import write_gps_exif
from geoswc.cli import main
from geoswc.data.exif import read_gps
from geoswc.data.places import gazetteer
from geoswc.geolocator import Geolocator
from geoswc.tagging.similar import load_embeddings
from geoswc.tagging.run import ReviewOptions, tag_photos
from geoswc.tagging.output import COLUMNS, read_rows

# Positions written into the EXIF of two photos.
GEOTAGS = {"p1.jpg": (48.858370, 2.294481), "p4.jpg": (-33.856784, 151.215297)}


def noise_photo(path, seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(scale=50, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Six distinct JPEG photos, two of them carrying EXIF GPS (written by geoswc.tagging.exif_copies)."""
    root = tmp_path_factory.mktemp("review") / "archive"
    root.mkdir()
    plain = tmp_path_factory.mktemp("plain")
    for i in range(6):
        name = f"p{i}.jpg"
        if name in GEOTAGS:
            source = noise_photo(plain / name, seed=i)
            write_gps_exif(str(source), str(root / name), *GEOTAGS[name])
        else:
            noise_photo(root / name, seed=i)
    return root


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Geolocator.from_pretrained(tiny_model_dir)


def haversine_km(lat1, lon1, lat2, lon2):
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def by_name(rows):
    return {row["path"].rsplit("/", 1)[1]: row for row in rows}


def test_exif_gps_reads_back_what_archive_wrote(archive, tmp_path):
    for name, (lat, lon) in GEOTAGS.items():
        got = read_gps(archive / name)
        assert got == pytest.approx((lat, lon), abs=1e-6)  # 1/100 s of arc is 3e-6 degrees
    assert read_gps(archive / "p0.jpg") is None
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a photo")
    assert read_gps(tmp_path / "junk.jpg") is None


def test_rows_hold_top_k_evidence_places_and_exif(archive, tiny_model_dir, model, tmp_path, capsys):
    out = tmp_path / "tags.csv"
    args = ["tag", str(archive), "--model", str(tiny_model_dir), "-o", str(out), "--workers", "0"]
    # The CE head: its cells hold background photos, so Search within Cell has evidence to show.
    assert main([*args, "--top-k", "3", "--evidence", "2", "--head", "ce"]) == 0
    printed = capsys.readouterr().out
    rows = by_name(read_rows(str(out), "csv"))
    assert set(rows) == {f"p{i}.jpg" for i in range(6)}
    gaz = gazetteer()
    distances = []
    for name, row in rows.items():
        # Independent of the pipeline: the model on the photo alone.
        (expected,) = model.predict([str(archive / name)], workers=0, head="ce")
        assert row["status"] == "ok"
        assert (row["lat"], row["lon"]) == pytest.approx((expected["lat"], expected["lon"]), abs=1e-4)
        partition = model.head_partition(expected["head"])
        tokens = list(partition.tokens)
        assert [c["token"] for c in row["top_cells"]] == [c["token"] for c in expected["top_cells"][:3]]
        for cell, ref in zip(row["top_cells"], expected["top_cells"]):
            assert cell["prob"] == pytest.approx(ref["prob"], abs=1e-5)
            centre = partition.centers_deg[tokens.index(cell["token"])]
            assert (cell["lat"], cell["lon"]) == pytest.approx(tuple(centre), abs=1e-9)
        assert len(row["evidence"]) == 2 and expected["method"] == "swc"
        assert [e["id"] for e in row["evidence"]] == [n["id"] for n in expected["neighbours"][:2]]
        for got, ref in zip(row["evidence"], expected["neighbours"]):
            assert got["similarity"] == pytest.approx(ref["similarity"], abs=1e-4)
            assert (got["lat"], got["lon"], got["in_cluster"]) == (ref["lat"], ref["lon"], ref["in_cluster"])
        # Place: the nearest gazetteer place by brute-force haversine over all ~144k places.
        lat_rad, lon_rad = np.radians(row["lat"]), np.radians(row["lon"])
        g = np.radians(gaz.latlon_deg_)
        h = (
            np.sin((g[:, 0] - lat_rad) / 2) ** 2
            + np.cos(lat_rad) * np.cos(g[:, 0]) * np.sin((g[:, 1] - lon_rad) / 2) ** 2
        )
        nearest = int(np.argmin(h))
        assert row["place"] == gaz.names_[nearest] and row["country_code"] == gaz.codes_[nearest]
        assert row["country"]
        if name in GEOTAGS:
            lat, lon = GEOTAGS[name]
            assert (row["exif_lat"], row["exif_lon"]) == pytest.approx((lat, lon), abs=1e-6)
            km = haversine_km(expected["lat"], expected["lon"], lat, lon)
            assert row["exif_distance_km"] == pytest.approx(km, abs=0.01)
            distances.append(km)
        else:
            assert row["exif_lat"] is None and row["exif_distance_km"] is None
    assert (
        f"2 photos carry EXIF GPS; median distance to the prediction {np.median(distances):.1f} km" in printed
    )

    # The flat CSV encoding: list columns are JSON text in one field, readable by csv + json alone.
    with open(out, newline="") as f:
        raw = list(csv.DictReader(f))
    assert tuple(raw[0]) == COLUMNS
    assert json.loads(raw[0]["top_cells"]) == by_name(read_rows(str(out), "csv"))["p0.jpg"]["top_cells"]

    # Review page beside the output: counts, the map (one marker per placed photo) and the histogram (its
    # bars count every photo), as inline SVG.
    page = (tmp_path / "tags.csv.html").read_text()
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg"') == 2 and "<td>ok</td><td>6</td>" in page
    assert "<script" not in page and "placed (6)" in page
    markers = page.split('class="photos">')[1].split("</g>")[0]
    assert markers.count("<circle") == 6
    assert sum(int(c) for c in re.findall(r'data-count="(\d+)"', page)) == 6


def test_min_confidence_abstains_and_keeps_the_guess(archive, model, tmp_path):
    tag_photos([str(archive)], model=model, out=str(tmp_path / "a.jsonl"), workers=0)
    placed = by_name(read_rows(str(tmp_path / "a.jsonl"), "jsonl"))
    confidences = sorted(row["confidence"] for row in placed.values())
    cut = (confidences[2] + confidences[3]) / 2  # three below, three above
    summary = tag_photos(
        [str(archive)],
        model=model,
        out=str(tmp_path / "b.geojson"),
        workers=0,
        review=ReviewOptions(min_confidence=cut),
    )
    assert (summary["ok"], summary["abstain"]) == (3, 3)
    rows = by_name(read_rows(str(tmp_path / "b.geojson"), "geojson"))
    for name, row in rows.items():
        ref = placed[name]
        if ref["confidence"] < cut:
            assert row["status"] == "abstain" and row["lat"] is None and row["lon"] is None
            assert (row["guess_lat"], row["guess_lon"]) == (ref["lat"], ref["lon"])
            assert row["place"] == ref["place"]  # the guess is still named for the reviewer
        else:
            assert row["status"] == "ok" and (row["lat"], row["lon"]) == (ref["lat"], ref["lon"])
            assert row["guess_lat"] is None
    features = json.loads((tmp_path / "b.geojson").read_text())["features"]
    assert sum(f["geometry"] is None for f in features) == 3  # abstentions publish no point


def test_country_precision_names_only_the_country(archive, model, tmp_path):
    tag_photos([str(archive)], model=model, out=str(tmp_path / "c.jsonl"), workers=0, precision="country")
    tag_photos([str(archive)], model=model, out=str(tmp_path / "e.jsonl"), workers=0)
    exact = by_name(read_rows(str(tmp_path / "e.jsonl"), "jsonl"))
    for name, row in by_name(read_rows(str(tmp_path / "c.jsonl"), "jsonl")).items():
        assert row["lat"] == round(exact[name]["lat"]) and row["lon"] == round(exact[name]["lon"])
        assert row["place"] is None and row["admin1"] is None and row["place_distance_km"] is None
        if name in GEOTAGS:  # the photo's own position is published no finer either
            assert (row["exif_lat"], row["exif_lon"]) == tuple(round(v) for v in GEOTAGS[name])


def test_skip_geotagged_and_resume_stay_exact(archive, model, tmp_path):
    out = tmp_path / "s.csv"
    review = ReviewOptions(skip_geotagged=True)
    photos = sorted(str(p) for p in archive.iterdir())
    # A first run over half the photos, then a resume over all: as one run over all.
    tag_photos(photos[:3], model=model, out=str(out), workers=0, review=review)
    summary = tag_photos(photos, model=model, out=str(out), workers=0, review=review, resume=True)
    assert (summary["ok"], summary["skipped"], summary["resumed"], summary["tagged"]) == (4, 2, 3, 3)
    rows = read_rows(str(out), "csv")
    assert [row["path"] for row in rows] == photos
    for row in rows:
        name = row["path"].rsplit("/", 1)[1]
        if name in GEOTAGS:
            assert row["status"] == "skipped" and row["lat"] is None and row["cell_token"] is None
            assert (row["exif_lat"], row["exif_lon"]) == pytest.approx(GEOTAGS[name], abs=1e-6)
        else:
            assert row["status"] == "ok"
    # Embeddings: one per placed row, in row order, equal to the model's on each photo alone.
    kept = load_embeddings(str(out))
    assert kept.paths == [row["path"] for row in rows if row["status"] == "ok"]
    import torch

    with torch.inference_mode():
        reference = np.concatenate(
            [model.embed(model.features(model.load_pixels(p)[None])).numpy() for p in kept.paths]
        )
    np.testing.assert_allclose(np.asarray(kept.vectors, dtype=np.float32), reference, atol=2e-3)
    again = tag_photos(photos, model=model, out=str(out), workers=0, review=review, resume=True)
    assert again["tagged"] == 0 and read_rows(str(out), "csv") == rows
    # Other review options than the output was started with are refused.
    with pytest.raises(ValueError, match="review"):
        tag_photos(photos, model=model, out=str(out), workers=0, resume=True)


def test_bad_review_options_name_the_value(archive, model, tmp_path):
    with pytest.raises(ValueError, match=r"--min-confidence must lie in \[0, 1\], got 1.5"):
        tag_photos(
            [str(archive)], model=model, out=str(tmp_path / "x.csv"), review=ReviewOptions(min_confidence=1.5)
        )
    with pytest.raises(ValueError, match="--top-k and --evidence must be >= 0"):
        tag_photos([str(archive)], model=model, out=str(tmp_path / "x.csv"), review=ReviewOptions(top_k=-1))


TWO_RANKS = """
import sys
from geoswc.tagging.run import Ranks, ReviewOptions, tag_photos
ranks = Ranks()
review = ReviewOptions(duplicates=True, top_k=2)
summary = tag_photos([{root!r}], model={model!r}, out=sys.argv[1], batch_size=2, workers=0, ranks=ranks,
                     review=review)
print(f"rank {{ranks.rank}} of {{ranks.world}} tagged {{summary['tagged']}}", flush=True)
"""


@pytest.mark.slow
def test_two_ranks_keep_embeddings_and_groups_as_one_process(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    from conftest import two_rank_launch

    root = tmp_path / "archive"
    root.mkdir()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
        Image.fromarray(small).resize((96, 72), Image.BILINEAR).save(root / f"v{seed}.jpg", quality=95)
    Image.open(root / "v4.jpg").save(root / "v4_rescan.jpg", quality=60)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(root=str(root), model=str(tiny_model_dir)))
    reference = tmp_path / "reference.jsonl"
    subprocess.run([sys.executable, str(script), str(reference)], check=True, timeout=240)
    out = tmp_path / "tags.csv"
    done = subprocess.run(
        [*two_rank_launch(), str(script), str(out)], check=True, timeout=400, capture_output=True, text=True
    )
    assert "rank 0 of 2 tagged 4" in done.stdout and "rank 1 of 2 tagged 3" in done.stdout
    expected, got = read_rows(str(reference), "jsonl"), read_rows(str(out), "csv")
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for row, ref in zip(got, expected):
        assert (row["status"], row["duplicate_group"], row["place"]) == (
            ref["status"],
            ref["duplicate_group"],
            ref["place"],
        )
        assert (row["lat"], row["lon"]) == pytest.approx((ref["lat"], ref["lon"]), abs=1e-6)
    groups = {r["path"].rsplit("/", 1)[1]: r["duplicate_group"] for r in got}
    assert groups["v4.jpg"] == groups["v4_rescan.jpg"] == 1 and groups["v0.jpg"] is None
    kept, ref_kept = load_embeddings(str(out)), load_embeddings(str(reference))
    assert kept.paths == ref_kept.paths == [r["path"] for r in got]
    np.testing.assert_allclose(
        np.asarray(kept.vectors, np.float32), np.asarray(ref_kept.vectors, np.float32), atol=2e-3
    )
    assert not list(tmp_path.glob("tags.csv.embeddings-*")) and not list(tmp_path.glob("tags.csv.journal-*"))
