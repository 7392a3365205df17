"""The metrics beyond Table 1 and the aggregation options of Search within Cell, against hand-computed values."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from geoswc.eval.benchmarks import published_results
from geoswc.eval.metrics import (
    breakdown_by_group,
    country_scores,
    geoguessr_points,
    retrieval_metrics,
    score_predictions,
)
from geoswc.swc import AGGREGATIONS, aggregate, largest_cluster_mean
from geoswc.swc.cluster import EARTH_RADIUS_KM

KM_PER_DEG = math.pi * EARTH_RADIUS_KM / 180  # 111.19 km


def test_geoguessr_points_by_hand():
    assert geoguessr_points(0.0) == pytest.approx(5000.0)
    assert geoguessr_points(1492.7) == pytest.approx(5000.0 / math.e)
    assert geoguessr_points([2 * 1492.7])[0] == pytest.approx(5000.0 / math.e**2)


def test_score_reports_geoguessr_mean_over_all_truth_photos():
    truth = pd.DataFrame({"IMG_ID": ["a", "b", "c"], "LAT": [0.0, 10.0, -10.0], "LON": [0.0, 20.0, -20.0]})
    # 0.5 km and 300 km along a meridian; "c" has no prediction and scores 0.
    pred = pd.DataFrame(
        {"IMG_ID": ["a", "b"], "LAT": [0.5 / KM_PER_DEG, 10 + 300 / KM_PER_DEG], "LON": [0.0, 20.0]}
    )
    res = score_predictions(pred, truth)
    expected = (5000 * math.exp(-0.5 / 1492.7) + 5000 * math.exp(-300 / 1492.7)) / 3
    assert res["geoguessr_score"] == pytest.approx(expected, rel=1e-9)
    assert res["mean_km"] == pytest.approx(150.25, rel=1e-9)


def test_breakdown_by_group_by_hand():
    groups = ["FR", "FR", "FR", "JP", ""]
    dist = [0.5, 30.0, np.nan, 3000.0, 1.0]  # the third French photo has no prediction
    out = breakdown_by_group(groups, dist, radii=(1, 25, 2500))
    assert list(out) == ["FR", "JP"]  # largest first, photos in no country left out
    assert out["FR"]["n"] == 3
    assert out["FR"]["accuracy"] == pytest.approx({"1": 100 / 3, "25": 100 / 3, "2500": 200 / 3})
    assert out["FR"]["median_km"] == pytest.approx(15.25)
    assert out["JP"]["accuracy"] == pytest.approx({"1": 0.0, "25": 0.0, "2500": 0.0})


def test_country_scores_by_hand():
    true = ["FR", "FR", "JP", "", "US"]
    pred = ["FR", "DE", "JP", "", ""]  # the US photo has no prediction
    out = country_scores(
        true, pred, [1.0, 500.0, 2.0, 5.0, np.nan], ["EU", "EU", "AS", "", "NA"], radii=(25,)
    )
    assert out["n_in_country"] == 4
    assert out["country_accuracy"] == pytest.approx(50.0)  # FR and JP right, of the four photos in a country
    assert out["by_continent"]["EU"] == {"n": 2, "accuracy": {"25": 50.0}, "median_km": 250.5}
    assert (
        out["by_continent"]["NA"]["accuracy"] == {"25": 0.0}
        and out["by_continent"]["NA"]["median_km"] is None
    )


def test_retrieval_metrics_by_hand():
    neighbours = np.array([[3, 5, 3, 7], [1, 2, 2, 2]])
    query = np.array([3, 2])
    relevant = np.array([2, 10])
    out = retrieval_metrics(neighbours, query, relevant, ns=(1, 2, 4))
    assert out["recall"] == pytest.approx({"1": 50.0, "2": 100.0, "4": 100.0})
    # Query 1: AP@1 = 1, AP@2 = 1/2, AP@4 = (1 + 2/3) / 2; query 2: 0, (1/2)/2, (1/2 + 2/3 + 3/4) / 4.
    ap1 = [1.0, 0.0]
    ap2 = [0.5, 0.25]
    ap4 = [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3 + 3 / 4) / 4]
    assert out["map"] == pytest.approx({"1": 50 * sum(ap1), "2": 50 * sum(ap2), "4": 50 * sum(ap4)})
    with pytest.raises(ValueError, match="between 1 and K = 4"):
        retrieval_metrics(neighbours, query, ns=(5,))


def test_retrieval_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    neighbours = rng.integers(-1, 6, size=(50, 8))
    query = rng.integers(-1, 6, size=50)
    relevant = rng.integers(0, 12, size=50)
    out = retrieval_metrics(neighbours, query, relevant, ns=(8,))
    aps, hits_any = [], []
    for cells, q, r in zip(neighbours, query, relevant):
        hits, total = 0, 0.0
        for i, c in enumerate(cells, 1):
            if q >= 0 and c == q:
                hits += 1
                total += hits / i
        hits_any.append(hits > 0)
        aps.append(total / min(r, 8) if min(r, 8) > 0 else 0.0)
    assert out["map"]["8"] == pytest.approx(100 * np.mean(aps))
    assert out["recall"]["8"] == pytest.approx(100 * np.mean(hits_any))


def test_published_rows_are_the_papers_table_1():
    rows = published_results("im2gps3k")
    assert rows["mvmf+rrm"]["1"] == 15.0 and rows["rrm"]["0.1"] == 3.6
    assert published_results("YFCC4k")["hc+rrm"]["2500"] == 55.4
    with pytest.raises(ValueError, match="im2gps, im2gps3k, yfcc4k"):
        published_results("mp16")


# --- aggregation options -----------------------------------------------------------------------------------
# Four neighbours on the equator, most similar first: one 111 km away from a tight group of three (0 m, 556 m
# and 222 m east of the origin). With eps = 1 km the three form the largest cluster.
_LON = np.array([1.0, 0.0, 0.005, 0.002])
_SIMS = np.array([[0.95, 0.9, 0.8, 0.5]])
_POINTS = np.stack([np.zeros(4), _LON], axis=1)[None]
_VALID = np.ones((1, 4), bool)


def _equator_mean(lon_deg, weights):
    """Spherical mean of points on the equator by hand: the angle of the weighted sum of unit vectors."""
    lon_rad = np.radians(lon_deg)
    w = np.asarray(weights, float)
    return math.degrees(math.atan2((w * np.sin(lon_rad)).sum(), (w * np.cos(lon_rad)).sum()))


@pytest.mark.parametrize(
    "method, lon, members",
    [
        ("largest-cluster-mean", _equator_mean(_LON[1:], [1, 1, 1]), [0, 1, 1, 1]),
        ("weighted-mean", _equator_mean(_LON[1:], [0.9, 0.8, 0.5]), [0, 1, 1, 1]),
        # Summed distances within the cluster: 0.778, 0.889 and 0.556 km: the last point is the medoid.
        ("medoid", 0.002, [0, 0, 0, 1]),
        ("top1", 1.0, [1, 0, 0, 0]),
        ("mean-all", _equator_mean(_LON, [1, 1, 1, 1]), [1, 1, 1, 1]),
        # Gaussian densities (bandwidth 1 km) 1.00, 2.83, 2.80 and 2.92 at the four points.
        ("kde-peak", 0.002, [0, 0, 0, 1]),
    ],
)
def test_aggregations_by_hand(method, lon, members):
    res = aggregate(_POINTS, _VALID, method=method, eps_km=1.0, similarity=_SIMS)
    assert res.latlon_deg[0] == pytest.approx([0.0, lon], abs=1e-9)
    assert res.members[0].astype(int).tolist() == members
    assert res.size[0] == sum(members)


def test_weighted_mean_differs_from_plain_mean_as_computed():
    plain = aggregate(_POINTS, _VALID, method="largest-cluster-mean", similarity=_SIMS).latlon_deg[0, 1]
    weighted = aggregate(_POINTS, _VALID, method="weighted-mean", similarity=_SIMS).latlon_deg[0, 1]
    # (0 * 0.9 + 0.005 * 0.8 + 0.002 * 0.5) / 2.2 against (0 + 0.005 + 0.002) / 3, to first order.
    assert weighted == pytest.approx(0.005 / 2.2, rel=1e-6) and plain == pytest.approx(0.007 / 3, rel=1e-6)


def test_default_aggregation_is_the_papers_largest_cluster_mean_bit_for_bit():
    rng = np.random.default_rng(0)
    latlon = np.stack([rng.uniform(40, 40.05, (30, 10)), rng.uniform(2, 2.05, (30, 10))], axis=-1)
    valid = rng.random((30, 10)) > 0.2
    sims = np.sort(rng.random((30, 10)), axis=1)[:, ::-1]
    ours = aggregate(latlon, valid, eps_km=1.0, similarity=sims)
    paper = largest_cluster_mean(latlon, valid, eps_km=1.0, similarity=sims)
    assert AGGREGATIONS[0] == "largest-cluster-mean"
    assert np.array_equal(ours.latlon_deg, paper.latlon_deg, equal_nan=True)
    assert np.array_equal(ours.members, paper.members)


def test_aggregations_skip_padding_and_rows_without_neighbours():
    points = np.array([[[0.0, 0.0], [np.nan, np.nan]], [[np.nan, np.nan], [np.nan, np.nan]]])
    valid = np.array([[True, False], [False, False]])
    for method in AGGREGATIONS:
        res = aggregate(points, valid, method=method, eps_km=1.0)
        assert res.latlon_deg[0] == pytest.approx([0.0, 0.0]), method
        assert np.isnan(res.latlon_deg[1]).all() and res.size.tolist() == [1, 0], method


def test_unknown_aggregation_names_the_choices():
    with pytest.raises(ValueError, match="largest-cluster-mean, weighted-mean, medoid"):
        aggregate(_POINTS, _VALID, method="centroid")


def test_score_countries_cli(tmp_path, capsys):
    from geoswc.cli import main

    truth = tmp_path / "truth.csv"
    truth.write_text("IMG_ID,LAT,LON\nparis,48.8566,2.3522\ntokyo,35.6762,139.6503\nlyon,45.764,4.8357\n")
    pred = tmp_path / "pred.csv"
    # Paris placed in Berlin, Tokyo in Osaka, Lyon without a prediction.
    pred.write_text("IMG_ID,LAT,LON\nparis,52.52,13.405\ntokyo,34.6937,135.5023\n")
    assert main(["score", str(pred), str(truth), "--json", "--countries"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_in_country"] == 3 and res["country_accuracy"] == pytest.approx(100 / 3)  # only Tokyo
    assert res["by_country"]["FR"]["n"] == 2 and res["by_country"]["JP"]["n"] == 1
    assert res["by_continent"]["EU"]["accuracy"]["2500"] == pytest.approx(50.0)  # Berlin within 2500 km
    assert res["by_continent"]["AS"]["accuracy"]["750"] == pytest.approx(100.0)  # Osaka is ~400 km away
    assert res["by_continent"]["AS"]["accuracy"]["25"] == 0.0
