import numpy as np
import pytest
from sklearn.cluster import DBSCAN

from geoswc.swc.cluster import (
    EARTH_RADIUS_KM,
    dbscan_labels,
    largest_cluster_mean,
    pairwise_haversine_km,
    spherical_mean,
)

KM_PER_DEG_LAT = np.pi * EARTH_RADIUS_KM / 180  # 111.19 km


def _random_neighbourhoods(rng, n_rows, k, spread_km=None):
    """Points scattered around a random centre per row, so clusters of every size occur."""
    if spread_km is None:
        spread_km = rng.uniform(0.2, 5.0, size=(n_rows, 1, 1))
    centre = np.stack([rng.uniform(-70, 70, n_rows), rng.uniform(-180, 180, n_rows)], axis=1)
    offset_km = rng.normal(scale=spread_km, size=(n_rows, k, 2))
    lat = centre[:, None, 0] + offset_km[..., 0] / KM_PER_DEG_LAT
    lon = centre[:, None, 1] + offset_km[..., 1] / (KM_PER_DEG_LAT * np.cos(np.radians(centre[:, None, 0])))
    lon = (lon + 180) % 360 - 180
    return np.stack([lat, lon], axis=-1)


def _sklearn_labels(points_deg, eps_km, min_samples):
    model = DBSCAN(eps=eps_km / EARTH_RADIUS_KM, min_samples=min_samples, metric="haversine")
    return model.fit(np.radians(points_deg)).labels_


def _same_partition(ours, theirs):
    """Labels agree up to renumbering, with noise (-1) in the same places."""
    if not np.array_equal(ours == -1, theirs == -1):
        return False
    mapping = {}
    for a, b in zip(ours, theirs):
        if a == -1:
            continue
        if mapping.setdefault(a, b) != b:
            return False
    return len(set(mapping.values())) == len(mapping)


def test_pairwise_haversine_matches_hand_values():
    # One degree of latitude on R = 6371 km, and a quarter of the equator.
    pts = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 90.0]]])
    d = pairwise_haversine_km(pts)[0]
    assert d[0, 1] == pytest.approx(111.19, abs=0.01)
    assert d[0, 2] == pytest.approx(np.pi / 2 * EARTH_RADIUS_KM, rel=1e-12)
    assert np.allclose(d, d.T)
    assert np.allclose(np.diag(d), 0)


@pytest.mark.parametrize("min_samples", [1, 3])
def test_labels_match_sklearn_dbscan(min_samples):
    rng = np.random.default_rng(min_samples)
    k = 10
    latlon = _random_neighbourhoods(rng, 200, k)
    valid = np.ones((200, k), dtype=bool)
    labels = dbscan_labels(latlon, valid, eps_km=1.0, min_samples=min_samples)
    sizes_seen = set()
    for row in range(len(latlon)):
        ref = _sklearn_labels(latlon[row], 1.0, min_samples)
        assert _same_partition(labels[row], ref), (row, labels[row], ref)
        sizes_seen.add(len(set(ref) - {-1}))
    # The data exercise single, several and (for min_samples=3) no clusters.
    assert len(sizes_seen) >= 3


def test_border_point_joins_first_cluster_like_sklearn():
    # Two tight core groups 1.8 km apart and a border point 0.9 km from each; min_samples=4 makes the border
    # point (3 neighbours, itself included) non-core.
    km = np.array([0.0, 0.02, 0.04, 0.3, 1.2, 2.1, 2.36, 2.38, 2.4])
    pts = np.stack([km / KM_PER_DEG_LAT, np.zeros_like(km)], axis=1)
    # Put the second group first in neighbour order so "first cluster" is not the lowest latitude.
    pts = pts[[5, 6, 7, 8, 4, 0, 1, 2, 3]]
    ours = dbscan_labels(pts[None], np.ones((1, 9), bool), eps_km=1.0, min_samples=4)[0]
    model = DBSCAN(eps=1.0 / EARTH_RADIUS_KM, min_samples=4, metric="haversine").fit(np.radians(pts))
    assert 4 not in model.core_sample_indices_
    assert _same_partition(ours, model.labels_)
    assert ours.tolist() == [0, 0, 0, 0, 0, 5, 5, 5, 5]


def test_largest_cluster_mean_picks_biggest_and_averages_on_sphere():
    # Three photos within 1 km near (10, 20), two far away: the mean of the three wins.
    d = 0.4 / KM_PER_DEG_LAT
    pts = np.array([[45.0, 7.0], [10.0, 20.0], [10.0 + d, 20.0], [45.0 + d, 7.0], [10.0 + 2 * d, 20.0]])
    res = largest_cluster_mean(pts[None], np.ones((1, 5), bool))
    assert res.size.tolist() == [3]
    assert res.members[0].tolist() == [False, True, True, False, True]
    assert res.latlon_deg[0, 0] == pytest.approx(10.0 + d, abs=1e-9)
    assert res.latlon_deg[0, 1] == pytest.approx(20.0, abs=1e-9)


def test_ties_go_to_cluster_with_most_similar_photo():
    far = [[-33.9, 151.2], [-33.9, 151.2 + 0.005]]
    near = [[48.85, 2.35], [48.85 + 0.005, 2.35]]
    # Order: near[0], far[0], far[1], near[1]; two clusters of two.
    pts = np.array([near[0], far[0], far[1], near[1]])[None]
    valid = np.ones((1, 4), bool)
    by_order = largest_cluster_mean(pts, valid)
    assert by_order.members[0].tolist() == [True, False, False, True]
    # With explicit similarities the sydney pair holds the most similar photo.
    sims = np.array([[0.5, 0.4, 0.9, 0.3]])
    by_sim = largest_cluster_mean(pts, valid, similarity=sims)
    assert by_sim.members[0].tolist() == [False, True, True, False]
    assert by_sim.latlon_deg[0, 0] == pytest.approx(-33.9, abs=1e-6)


def test_cluster_across_antimeridian():
    # 179.996 E and 179.996 W are ~0.9 km apart at the equator: one cluster, mean on the +-180 line.
    pts = np.array([[[0.0, 179.996], [0.0, -179.996], [0.0, 0.0]]])
    res = largest_cluster_mean(pts, np.ones((1, 3), bool))
    assert res.size[0] == 2
    assert abs(res.latlon_deg[0, 1]) == pytest.approx(180.0, abs=1e-9)
    assert res.latlon_deg[0, 0] == pytest.approx(0.0, abs=1e-9)
    ref = _sklearn_labels(pts[0], 1.0, 1)
    assert _same_partition(dbscan_labels(pts, np.ones((1, 3), bool))[0], ref)


def test_padding_is_ignored():
    rng = np.random.default_rng(7)
    latlon = _random_neighbourhoods(rng, 200, 10)
    n_valid = rng.integers(0, 11, size=200)
    valid = np.arange(10)[None, :] < n_valid[:, None]
    # Padding holds garbage (NaN or a point that would join a cluster) and must change nothing.
    padded = latlon.copy()
    padded[~valid] = np.nan
    padded[~valid & (rng.random((200, 10)) < 0.5)] = latlon[0, 0]
    labels = dbscan_labels(padded, valid)
    res = largest_cluster_mean(padded, valid)
    for row in range(200):
        m = n_valid[row]
        assert (labels[row, m:] == -1).all()
        assert not res.members[row, m:].any()
        if m == 0:
            assert res.size[row] == 0 and np.isnan(res.latlon_deg[row]).all()
            continue
        ref = _sklearn_labels(latlon[row, :m], 1.0, 1)
        assert _same_partition(labels[row, :m], ref)
        counts = np.bincount(ref)
        # Largest cluster; among equals, the one holding the lowest index.
        best = ref[np.flatnonzero(counts[ref] == counts.max())[0]]
        assert res.members[row, :m].tolist() == (ref == best).tolist()


def test_agrees_with_per_photo_sklearn_reference_on_means():
    rng = np.random.default_rng(3)
    latlon = _random_neighbourhoods(rng, 150, 10, spread_km=2.0)
    valid = np.ones((150, 10), bool)
    res = largest_cluster_mean(latlon, valid, min_samples=3)
    for row in range(150):
        ref = _sklearn_labels(latlon[row], 1.0, 3)
        if (ref == -1).all():
            expected = latlon[row, :1]
        else:
            counts = np.bincount(ref[ref >= 0])
            first = np.flatnonzero((ref >= 0) & (counts[np.maximum(ref, 0)] == counts.max()))[0]
            expected = latlon[row, ref == ref[first]]
        mean = spherical_mean(expected[None], np.ones((1, len(expected))))[0]
        assert np.allclose(res.latlon_deg[row], mean, atol=1e-9)
        assert res.size[row] == len(expected)


def test_spherical_mean_hand_values():
    pts = np.array([[[0.0, 0.0], [0.0, 90.0]], [[89.0, 0.0], [89.0, 180.0]]])
    out = spherical_mean(pts, np.ones((2, 2)))
    assert out[0] == pytest.approx([0.0, 45.0])
    assert out[1, 0] == pytest.approx(90.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"eps_km": -1.0}, "eps_km"), ({"min_samples": 0}, "min_samples")],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        largest_cluster_mean(np.zeros((1, 2, 2)), np.ones((1, 2), bool), **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="Q, K, 2"):
        largest_cluster_mean(np.zeros((2, 2)), np.ones((1, 2), bool))
    with pytest.raises(ValueError, match="valid"):
        largest_cluster_mean(np.zeros((1, 2, 2)), np.ones((1, 3), bool))
