"""Selective prediction: prediction density, the localizable split and the coverage curve."""

import ast
import math

import numpy as np
import pytest

from geoswc.eval.selective import coverage_curve, prediction_density, selective_split, selective_summary

KM_PER_DEG = math.pi * 6371.0 / 180  # 111.19 km


def test_density_by_hand():
    # Cell centres on the equator at 0, 11.1, 111, 1112 and 3336 km from the first (the best) cell.
    centers = np.array([[0.0, 0.0], [0.0, 0.1], [0.0, 1.0], [0.0, 10.0], [0.0, 30.0]])
    probs = np.array([[0.4, 0.2, 0.15, 0.15, 0.1]])
    density = prediction_density(probs, centers)
    assert density[0] == pytest.approx([0.4, 0.6, 0.75, 0.75, 0.9])
    # Around another best cell (given explicitly): the 10-degree cell sees the 30-degree one at 2224 km.
    around = prediction_density(probs, centers, best=[3], scales_km=(1, 2500))
    assert around[0] == pytest.approx([0.15, 1.0])


def _authors_prediction_density(shared_reference):
    """``prediction_density`` and ``haversine`` of the authors' src/utils.py, run as written (the rest of the
    module needs packages this project does not, so the two functions are taken from its source)."""
    source = (shared_reference / "peers" / "visloc-estimation" / "src" / "utils.py").read_text()
    tree = ast.parse(source)
    wanted = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name in ("prediction_density", "haversine")
    ]
    assert len(wanted) == 2
    namespace = {"np": np}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "utils.py", "exec"), namespace)
    return namespace["prediction_density"]


@pytest.mark.shared
def test_density_matches_the_authors_code(shared_reference):
    oracle = _authors_prediction_density(shared_reference)
    rng = np.random.default_rng(0)
    # Clustered centres so that every scale separates some cells from others.
    hubs = rng.uniform([-60, -180], [70, 180], size=(12, 2))
    centers = hubs[rng.integers(0, 12, 400)] + rng.normal(scale=0.3, size=(400, 2))
    centers[:, 0] = np.clip(centers[:, 0], -89, 89)
    logits = rng.normal(scale=3.0, size=(50, 400))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ours = prediction_density(probs, centers)
    for i in range(len(probs)):
        theirs = oracle(int(np.argmax(probs[i])), probs[i], centers)
        assert ours[i] == pytest.approx([theirs[s] for s in (1, 25, 200, 750, 2500)], abs=1e-12)


def test_localizable_split_by_hand():
    dist = np.array([0.5, 30.0, 300.0, 5.0])
    density = np.array([0.5, 0.1, 0.2, 0.9])  # 0.2 is not above the threshold: the authors compare strictly
    split = selective_split(dist, density, threshold=0.2, radii=(1, 25))
    assert split["localizable"] == {
        "n": 2,
        "share": 50.0,
        "accuracy": {"1": 50.0, "25": 100.0},
        "median_km": 2.75,
    }
    assert split["non_localizable"] == {
        "n": 2,
        "share": 50.0,
        "accuracy": {"1": 0.0, "25": 0.0},
        "median_km": 165.0,
    }


def test_coverage_curve_by_hand():
    dist = np.array([0.5, 30.0, 300.0, 5.0, 20.0])
    confidence = np.array([0.9, 0.1, 0.3, 0.8, 0.5])
    curve = coverage_curve(dist, confidence, coverages=(1.0, 0.6, 0.2))
    # Most confident first: 0.5 km (0.9), 5 km (0.8), 20 km (0.5), 300 km (0.3), 30 km (0.1).
    assert [p["n"] for p in curve] == [5, 3, 1]
    assert [p["accuracy"]["1"] for p in curve] == pytest.approx([20.0, 100 / 3, 100.0])
    assert [p["accuracy"]["25"] for p in curve] == pytest.approx([60.0, 100.0, 100.0])
    assert [p["min_confidence"] for p in curve] == [0.1, 0.5, 0.9]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        coverage_curve(dist, confidence, coverages=(0.0,))


def test_summary_takes_the_25_km_column():
    dist = np.array([1.0, 100.0])
    densities = np.array([[0.1, 0.3, 0.5, 0.7, 0.9], [0.0, 0.1, 0.2, 0.3, 0.4]])
    out = selective_summary(dist, densities, head="hc")
    assert out["localizable"]["n"] == 1 and out["localizable"]["median_km"] == 1.0
    assert out["mean_density"] == pytest.approx({"1": 0.05, "25": 0.2, "200": 0.35, "750": 0.5, "2500": 0.65})
    assert out["head"] == "hc" and out["curve"][0]["n"] == 2
