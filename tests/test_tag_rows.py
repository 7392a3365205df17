"""`geoswc.tagging.run.tag_rows`: the rows of ``geoswc tag`` for photos in memory, checked against the rows
`tag_photos` writes for the same files, the model's own predictions and hand-written EXIF positions."""

import json

import numpy as np
import pytest
from PIL import Image

from geoswc.tagging.exif_copies import write_gps_exif
from geoswc.geolocator import Geolocator
from geoswc.tagging.run import ReviewOptions, tag_photos, tag_rows
from geoswc.tagging.output import COLUMNS, read_rows

# 48.8584 N 2.2945 E is 48 51' 30.24", 2 17' 40.2": whole hundredths of a second, exact in EXIF rationals.
EIFFEL = (48.8584, 2.2945)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Geolocator.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three JPEGs (the first with EXIF GPS written by geoswc.tagging.exif_copies) and a file that is no photo."""
    root = tmp_path_factory.mktemp("rows")
    plain = tmp_path_factory.mktemp("plain")
    paths = []
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        source = plain / f"p{i}.jpg"
        Image.fromarray(pixels).save(source, quality=92)
        if i == 0:
            write_gps_exif(str(source), str(root / source.name), *EIFFEL)
        else:
            (root / source.name).write_bytes(source.read_bytes())
        paths.append(str(root / source.name))
    (root / "notes.jpg").write_bytes(b"not a photo")
    paths.append(str(root / "notes.jpg"))
    return paths


def test_rows_are_the_rows_tag_photos_writes(model, photos, tmp_path):
    review = ReviewOptions(top_k=3, evidence=2, keep_embeddings=False, html=False)
    rows = tag_rows(photos, model=model, head="ce", review=review)
    out = tmp_path / "tags.jsonl"
    tag_photos(photos, model=model, out=str(out), head="ce", review=review, workers=0)
    written = {row["path"]: row for row in read_rows(str(out), "jsonl")}
    assert [row["path"] for row in rows] == photos
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "error"]
    for row in rows:
        assert list(row) == list(COLUMNS)
        # Through JSON, as the file holds them.
        assert json.loads(json.dumps(row)) == written[row["path"]]
    assert rows[3]["error"].startswith("not a recognised image") and rows[3]["lat"] is None
    assert len(rows[0]["top_cells"]) == 3 and len(rows[0]["evidence"]) <= 2


def test_positions_are_the_models_and_exif_is_reported(model, photos):
    rows = tag_rows(photos[:3], model=model, head="ce")
    expected = model.predict(photos[:3], head="ce")
    for row, record in zip(rows, expected):
        assert (row["lat"], row["lon"]) == (record["lat"], record["lon"])
        assert row["cell_token"] == record["cell_token"] and row["confidence"] == record["confidence"]
    assert (rows[0]["exif_lat"], rows[0]["exif_lon"]) == EIFFEL
    # Haversine on R = 6371 km by hand, rounded to metres.
    lat1, lon1, lat2, lon2 = np.radians([rows[0]["lat"], rows[0]["lon"], *EIFFEL])
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    assert rows[0]["exif_distance_km"] == pytest.approx(2 * 6371.0 * np.arcsin(np.sqrt(h)), abs=1e-3)
    assert rows[1]["exif_lat"] is None and rows[1]["exif_distance_km"] is None
    # A PIL image opened from the file keeps its EXIF; an array has none. Both are named by their position.
    with Image.open(photos[0]) as image:
        image.load()
        from_image, from_array = tag_rows([image, np.asarray(image.convert("RGB"))], model=model, head="ce")
    assert from_image["path"] == "photo 0" and from_array["path"] == "photo 1"
    assert (from_image["exif_lat"], from_image["exif_lon"]) == EIFFEL
    assert from_array["exif_lat"] is None
    assert from_image["cell_token"] == from_array["cell_token"]


def test_min_confidence_abstains_with_the_prediction_as_the_guess(model, photos):
    (plain,) = tag_rows(photos[1], model=model, head="ce")
    assert plain["status"] == "ok" and 0.0 < plain["confidence"] < 1.0
    (sure,) = tag_rows(photos[1], model=model, head="ce", review=ReviewOptions(min_confidence=0.0))
    assert sure == plain
    (unsure,) = tag_rows(photos[1], model=model, head="ce", review=ReviewOptions(min_confidence=1.0))
    assert unsure["status"] == "abstain" and unsure["lat"] is None and unsure["lon"] is None
    assert (unsure["guess_lat"], unsure["guess_lon"]) == (plain["lat"], plain["lon"])
    assert unsure["place"] == plain["place"] and unsure["country"] == plain["country"]
    (at,) = tag_rows(
        photos[1], model=model, head="ce", review=ReviewOptions(min_confidence=plain["confidence"])
    )
    assert at["status"] == "ok"  # the threshold is inclusive


def test_skip_geotagged_precision_and_refusals(model, photos):
    review = ReviewOptions(skip_geotagged=True)
    rows = tag_rows(photos[:2], model=model, head="ce", review=review, precision="city")
    assert rows[0]["status"] == "skipped" and (rows[0]["exif_lat"], rows[0]["exif_lon"]) == (48.86, 2.29)
    assert rows[0]["lat"] is None
    assert rows[1]["status"] == "ok" and rows[1]["lat"] == round(rows[1]["lat"], 2)
    with pytest.raises(ValueError, match="unknown precision 'town'"):
        tag_rows(photos[:1], model=model, precision="town")
    with pytest.raises(ValueError, match="--min-confidence must lie in"):
        tag_rows(photos[:1], model=model, review=ReviewOptions(min_confidence=2.0))
    with pytest.raises(ValueError, match="tag_photos"):
        tag_rows(photos[:1], model=model, review=ReviewOptions(duplicates=True))
    with pytest.raises(ValueError, match="unknown head 'vmff'"):
        tag_rows(photos[:1], model=model, head="vmff")
