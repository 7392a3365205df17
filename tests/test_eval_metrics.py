import math

import numpy as np
import pandas as pd
import pytest
from haversine import Unit, haversine

from geoswc.eval import (
    EARTH_RADIUS_KM,
    RADII_KM,
    VALIDATION_RADII_KM,
    accuracy_at,
    format_table,
    haversine_km,
    score_predictions,
)

KM_PER_DEG = math.pi * 6371.0 / 180.0  # 111.19 km per degree of latitude on R = 6371 km


def test_constants_are_the_protocol():
    from geoswc.data import sphere
    from geoswc.swc import cluster

    assert EARTH_RADIUS_KM == 6371.0
    # One radius for every component: the data folder owns it, the others import it.
    assert EARTH_RADIUS_KM is sphere.EARTH_RADIUS_KM is cluster.EARTH_RADIUS_KM
    assert RADII_KM == (0.1, 1, 5, 10, 25, 200, 750, 2500)
    assert VALIDATION_RADII_KM == (1, 25, 200, 750, 2500)


def test_accuracy_at_against_hand_computed_distances():
    # True positions on the equator; predictions moved north along the meridian by 0, 1, 111.19 (1 degree),
    # 500, 1000 and 3000 km (distance / 111.19 km per degree).
    true = np.array([[0.0, 10.0]] * 6)
    dist_km = np.array([0.0, 1.0, KM_PER_DEG, 500.0, 1000.0, 3000.0])
    pred = np.stack([dist_km / KM_PER_DEG, np.full(6, 10.0)], axis=1)
    res = accuracy_at(pred, true)
    assert list(res) == ["acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km"]
    # 1.0 km counts at 1 km (<= r); fractions of all 6 photos.
    assert res["acc_1km"] == pytest.approx(2 / 6)
    assert res["acc_25km"] == pytest.approx(2 / 6)
    assert res["acc_200km"] == pytest.approx(3 / 6)
    assert res["acc_750km"] == pytest.approx(4 / 6)
    assert res["acc_2500km"] == pytest.approx(5 / 6)
    assert res["median_km"] == pytest.approx((111.19 + 500.0) / 2, abs=0.01)


def test_accuracy_at_other_radii_and_bad_input():
    res = accuracy_at([[1.0, 0.0]], [[0.0, 0.0]], radii_km=(0.1, 111, 112.0))
    expected = {"acc_0.1km": 0.0, "acc_111km": 0.0, "acc_112km": 1.0, "median_km": 111.19}
    assert res == pytest.approx(expected, abs=0.005)
    empty = accuracy_at(np.zeros((0, 2)), np.zeros((0, 2)))
    assert list(empty) == [f"acc_{r}km" for r in VALIDATION_RADII_KM] + ["median_km"]
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError, match=r"\(N, 2\).*\(2, 2\) and \(1, 2\)"):
        accuracy_at(np.zeros((2, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="radii"):
        accuracy_at(np.zeros((1, 2)), np.zeros((1, 2)), radii_km=(-1,))


def test_one_degree_of_latitude():
    assert haversine_km(0.0, 0.0, 1.0, 0.0) == pytest.approx(111.19, abs=0.005)
    assert haversine_km(45.0, 7.0, 46.0, 7.0) == pytest.approx(KM_PER_DEG, rel=1e-12)


def test_matches_the_haversine_package_on_random_pairs():
    rng = np.random.default_rng(0)
    lat1, lat2 = rng.uniform(-90, 90, (2, 2000))
    lon1, lon2 = rng.uniform(-180, 180, (2, 2000))
    ours = haversine_km(lat1, lon1, lat2, lon2)
    ref = [haversine((a, b), (c, d), unit=Unit.KILOMETERS) for a, b, c, d in zip(lat1, lon1, lat2, lon2)]
    # The haversine package uses R = 6371.0088 km; rescale to the protocol's sphere.
    np.testing.assert_allclose(ours, np.array(ref) * 6371.0 / 6371.0088, rtol=1e-9)


def test_tiny_and_antipodal_distances_are_accurate():
    # 1e-7 degree along a meridian = 1.1119 cm.
    assert haversine_km(10.0, 20.0, 10.0 + 1e-7, 20.0) == pytest.approx(1e-7 * KM_PER_DEG, rel=1e-6)
    assert haversine_km(10.0, 20.0, 10.0, 20.0) == 0.0
    half_circumference = math.pi * 6371.0
    assert haversine_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(half_circumference, rel=1e-12)
    assert haversine_km(90.0, 0.0, -90.0, 0.0) == pytest.approx(half_circumference, rel=1e-12)
    # 1 mm short of antipodal: still resolved, not collapsed to the half circumference.
    eps_deg = 1e-6 / KM_PER_DEG
    d = haversine_km(0.0, 0.0, 0.0, 180.0 - eps_deg)
    assert half_circumference - d == pytest.approx(1e-6, rel=1e-2)


def test_broadcasts_and_crosses_the_antimeridian():
    d = haversine_km(np.zeros((3, 1)), 179.5, np.zeros((1, 4)), -179.5)
    assert d.shape == (3, 4)
    np.testing.assert_allclose(d, KM_PER_DEG, rtol=1e-12)


def _frame(ids, lat, lon):
    return pd.DataFrame({"IMG_ID": ids, "LAT": lat, "LON": lon})


def test_score_counts_boundaries_missing_and_extras():
    # Truth at the equator; predictions displaced along the meridian by known distances.
    truth = _frame(["a", "b", "c", "d", "e"], [0.0] * 5, [0.0] * 5)
    dist_km = {"a": 0.05, "b": 1.0, "c": 20.0, "d": 3000.0}
    pred = _frame(
        list(dist_km) + ["not_in_truth"], [v / KM_PER_DEG for v in dist_km.values()] + [1.0], [0.0] * 5
    )
    res = score_predictions(pred, truth)
    assert list(res) == [
        "n_truth",
        "n_scored",
        "n_missing",
        "accuracy",
        "median_km",
        "mean_km",
        "geoguessr_score",
    ]
    assert (res["n_truth"], res["n_scored"], res["n_missing"]) == (5, 4, 1)
    # Denominator = 5 ground-truth photos; "e" has no prediction and is wrong everywhere; 1.0 km counts at 1 km.
    assert res["accuracy"] == pytest.approx(
        {"0.1": 20.0, "1": 40.0, "5": 40.0, "10": 40.0, "25": 60.0, "200": 60.0, "750": 60.0, "2500": 60.0}
    )
    assert res["median_km"] == pytest.approx((1.0 + 20.0) / 2, rel=1e-9)
    assert res["mean_km"] == pytest.approx(sum(dist_km.values()) / 4, rel=1e-9)


def test_score_exactly_on_the_radius_is_correct():
    lat = 25.0 / KM_PER_DEG
    res = score_predictions(_frame(["x"], [lat], [0.0]), _frame(["x"], [0.0], [0.0]), radii=(25,))
    assert haversine_km(0, 0, lat, 0) <= 25.0
    assert res["accuracy"] == {"25": 100.0}


def test_score_matches_ids_across_forms_and_case_of_columns():
    truth = pd.DataFrame(
        {
            "img_id": ["1000269685_e60e9cdfb4_1125_78841376@N00.jpg", "45/77/3228511372.jpg"],
            "Lat": [1, 2],
            "longitude": [3, 4],
            "extra": ["x", "y"],
        }
    )
    pred = _frame(["1000269685", "dir/3228511372.JPG"], [1.0, 2.0], [3.0, 4.0])
    res = score_predictions(pred, truth)
    assert res["n_scored"] == 2 and res["accuracy"]["0.1"] == 100.0 and res["median_km"] == 0.0


def test_score_with_nothing_scored_reports_none():
    res = score_predictions(_frame([], [], []), _frame(["a", "b"], [0.0, 1.0], [0.0, 1.0]))
    assert (res["n_scored"], res["n_missing"]) == (0, 2)
    assert set(res["accuracy"].values()) == {0.0}
    assert res["median_km"] is None and res["mean_km"] is None


def test_score_rejects_bad_input():
    truth = _frame(["a"], [0.0], [0.0])
    with pytest.raises(ValueError, match="ground truth is empty|no rows"):
        score_predictions(truth, _frame([], [], []))
    with pytest.raises(ValueError, match=r"predictions: missing column LON"):
        score_predictions(pd.DataFrame({"IMG_ID": ["a"], "LAT": [0.0]}), truth)
    with pytest.raises(ValueError, match=r"predictions: row 2, column LAT: value 91.0 out of range"):
        score_predictions(_frame(["a", "b"], [0.0, 91.0], [0.0, 0.0]), truth)
    with pytest.raises(ValueError, match=r"row 2, column IMG_ID: duplicate image ID 'a'"):
        score_predictions(_frame(["a", "a"], [0.0, 0.0], [0.0, 0.0]), truth)
    with pytest.raises(ValueError, match="radii"):
        score_predictions(truth, truth, radii=(-1,))


def test_format_table_shows_every_radius_and_counts():
    res = {
        "n_truth": 4,
        "n_scored": 3,
        "n_missing": 1,
        "median_km": 12.345,
        "mean_km": 20.0,
        "accuracy": {"0.1": 0.0, "1": 25.0, "25": 75.0, "2500": 75.0},
    }
    lines = format_table({"hc+rrm": res}).splitlines()
    assert lines[0].split() == [
        "method",
        "0.1",
        "km",
        "1",
        "km",
        "25",
        "km",
        "2500",
        "km",
        "median",
        "km",
        "n",
        "missing",
    ]
    assert lines[2].split() == ["hc+rrm", "0.0", "25.0", "75.0", "75.0", "12.3", "3", "1"]
