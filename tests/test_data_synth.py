import json
import re

import numpy as np
import pandas as pd
import pytest

from geoswc.cli import main
from geoswc.data.images import decode_image
from geoswc.data.metadata import read_metadata
from geoswc.data.synth import RegionalField, load_coordinate_sample, make_world


def _haversine_km(a, b):
    lat1, lon1, lat2, lon2 = map(np.radians, (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(h))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    spec = make_world(out, n_train=400, n_test=60, seed=3, progress=False, workers=1)
    return out, spec


def test_csvs_are_mp16_format_and_readable(world):
    out, spec = world
    for name, n in (("train.csv", 400), ("test.csv", 60)):
        assert open(out / name).readline().strip() == "IMG_ID,AUTHOR,LAT,LON"
        frame = read_metadata(out / name)
        assert len(frame) == n and list(frame.columns) == ["IMG_ID", "AUTHOR", "LAT", "LON"]
        assert all(re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{2}/\d{10}\.jpg", i) for i in frame["IMG_ID"])
        assert all(re.fullmatch(r"\d{8}@N\d{2}", a) for a in frame["AUTHOR"])
        image = decode_image(out / "images" / frame["IMG_ID"].iloc[0])
        assert image.size == (128, 96)
        assert all((out / "images" / i).is_file() for i in frame["IMG_ID"])
    train, test = read_metadata(out / "train.csv"), read_metadata(out / "test.csv")
    assert not set(train["AUTHOR"]) & set(test["AUTHOR"])  # leak-free
    assert not set(train["IMG_ID"]) & set(test["IMG_ID"])
    assert json.loads((out / "world.json").read_text())["n_landmarks"] == spec.n_landmarks == 26


def test_same_seed_same_world_whatever_the_workers(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    make_world(again, n_train=400, n_test=60, seed=3, progress=False, workers=2)
    for name in ("train.csv", "test.csv", "landmarks.csv", "photo_landmarks.csv"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    ids = read_metadata(out / "train.csv")["IMG_ID"]
    for img_id in ids[::37]:
        assert (out / "images" / img_id).read_bytes() == (again / "images" / img_id).read_bytes()
    other = tmp_path / "other"
    make_world(other, n_train=400, n_test=60, seed=4, progress=False)
    assert (other / "train.csv").read_bytes() != (out / "train.csv").read_bytes()


def test_landmark_photos_within_a_few_hundred_metres(world):
    out, spec = world
    landmarks = pd.read_csv(out / "landmarks.csv")
    labels = pd.read_csv(out / "photo_landmarks.csv")
    photos = pd.concat([read_metadata(out / "train.csv"), read_metadata(out / "test.csv")])
    merged = labels.merge(photos, on="IMG_ID")
    assert len(merged) == 460
    shown = merged[merged["LANDMARK"] >= 0]
    where = landmarks.set_index("LANDMARK").loc[shown["LANDMARK"], ["LAT", "LON"]].to_numpy()
    dist = _haversine_km(shown[["LAT", "LON"]].to_numpy(), where)
    assert dist.max() <= spec.landmark_radius_km + 1e-3
    # Share without a landmark ~ 35 %; every landmark seen in a test photo has >= 2 training photos.
    assert 0.25 < (merged["LANDMARK"] < 0).mean() < 0.45
    train_counts = labels[labels["SPLIT"] == "train"]["LANDMARK"].value_counts()
    test_landmarks = labels[(labels["SPLIT"] == "test") & (labels["LANDMARK"] >= 0)]["LANDMARK"]
    assert (train_counts.reindex(test_landmarks).fillna(0) >= 2).all()


def test_landmarks_look_the_same_from_every_viewpoint_and_differ_from_each_other(world):
    out, _ = world
    labels = pd.read_csv(out / "photo_landmarks.csv")
    counts = labels[labels["LANDMARK"] >= 0]["LANDMARK"].value_counts()
    a, b = counts.index[:2]

    def colours(landmark):
        ids = labels[labels["LANDMARK"] == landmark]["IMG_ID"][:3]
        return [np.asarray(decode_image(out / "images" / i)).reshape(-1, 3) for i in ids]

    def histogram(pixels):
        h = np.histogramdd(pixels // 64, bins=(4, 4, 4), range=((0, 4),) * 3)[0].ravel()
        return h / h.sum()

    same = [histogram(p) for p in colours(a)]
    other = histogram(colours(b)[0])
    within = np.abs(same[0] - same[1]).sum()
    across = np.abs(same[0] - other).sum()
    assert within < across


def test_regional_field_is_smooth_over_km_and_varies_over_thousands():
    field = RegionalField.random(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    points = np.column_stack([rng.uniform(-60, 60, 500), rng.uniform(-180, 180, 500)])
    # 1 km north is 1/111.19 degree of latitude.
    near = field(points + [1 / 111.19, 0]) - field(points)
    far = field(points + [18.0, 0]) - field(points)  # 18 degrees of latitude ~ 2,000 km
    assert np.abs(near).max() < 0.01
    assert np.abs(far).mean() > 0.1
    values = field(points)
    assert values.min() >= 0 and values.max() <= 1


def test_coordinates_follow_the_mp16_sample(world, shared_reference):
    out, _ = world
    reference = pd.read_csv(shared_reference / "coordinates" / "mp16_sample_100k.csv").to_numpy()
    packaged = load_coordinate_sample()
    assert packaged.shape == (20000, 2)
    # Every packaged row is a reference row rounded to 4 decimals.
    ref_rows = set(map(tuple, np.round(reference, 4)))
    assert all(tuple(r) in ref_rows for r in packaged[:2000])
    photos = pd.concat([read_metadata(out / "train.csv"), read_metadata(out / "test.csv")])[["LAT", "LON"]]

    def regions(latlon):
        lat, lon = latlon[:, 0], latlon[:, 1]
        europe = (lat > 35) & (lat < 72) & (lon > -12) & (lon < 40)
        america = (lat > 15) & (lat < 72) & (lon > -170) & (lon < -50)
        south = lat < 0
        return np.array([europe.mean(), america.mean(), south.mean()])

    assert np.abs(regions(photos.to_numpy()) - regions(reference)).max() < 0.08


def test_cli_synth(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "synth",
                str(tmp_path / "w"),
                "--train",
                "50",
                "--test",
                "10",
                "--seed",
                "1",
                "--size",
                "64",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "wrote 50 training and 10 test photos (64x48" in capsys.readouterr().out
    assert len(read_metadata(tmp_path / "w" / "train.csv")) == 50
    assert decode_image(
        tmp_path / "w" / "images" / read_metadata(tmp_path / "w" / "test.csv")["IMG_ID"][0]
    ).size == (64, 48)
