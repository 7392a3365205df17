import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN

from geoswc.retrieval.index import BackgroundIndex
from geoswc.swc import nearest_background, search_within_cell, spherical_mean
from geoswc.swc.cluster import EARTH_RADIUS_KM

KM_PER_DEG_LAT = np.pi * EARTH_RADIUS_KM / 180
N_CELLS = 12
EMPTY_CELL = 7


@pytest.fixture(scope="module")
def background():
    """300 photos in 11 of 12 cells (cell 7 empty); each cell's photos sit in a few tight spots."""
    rng = np.random.default_rng(0)
    cells = rng.choice([c for c in range(N_CELLS) if c != EMPTY_CELL], size=300)
    spots = rng.uniform([-60, -180], [60, 180], size=(N_CELLS, 3, 2))
    spot = spots[cells, rng.integers(0, 3, size=300)]
    jitter_km = rng.normal(scale=0.3, size=(300, 2))
    latlon = spot + jitter_km / KM_PER_DEG_LAT
    emb = rng.normal(size=(300, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"bg{i}" for i in range(300)]
    index = BackgroundIndex(dtype="float32").build(
        emb, cell_idx=cells, latlon=latlon, ids=ids, n_cells=N_CELLS, fingerprint="test"
    )
    return index, emb, cells, latlon


def _reference(query, allowed_cells, emb, cells, latlon, k, eps_km=1.0, min_samples=1):
    """Brute force: top-k by inner product among the allowed cells, one sklearn DBSCAN, largest cluster."""
    candidates = np.flatnonzero(np.isin(cells, allowed_cells))
    if len(candidates) == 0:
        return None
    sims = emb[candidates] @ query
    top = candidates[np.argsort(-sims, kind="stable")[:k]]
    pts = latlon[top]
    labels = (
        DBSCAN(eps=eps_km / EARTH_RADIUS_KM, min_samples=min_samples, metric="haversine")
        .fit(np.radians(pts))
        .labels_
    )
    if (labels < 0).all():
        chosen = pts[:1]
    else:
        counts = np.bincount(labels[labels >= 0])
        first = np.flatnonzero((labels >= 0) & (counts[np.maximum(labels, 0)] == counts.max()))[0]
        chosen = pts[labels == labels[first]]
    return spherical_mean(chosen[None], np.ones((1, len(chosen))))[0], top


def _queries(n, seed=1):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 32)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.mark.parametrize("k, min_samples", [(10, 1), (5, 1), (10, 2)])
def test_search_within_cell_matches_brute_force(background, k, min_samples):
    index, emb, cells, latlon = background
    queries = _queries(60)
    query_cells = np.random.default_rng(2).integers(0, N_CELLS, size=60)
    res = search_within_cell(queries, query_cells, index, k=k, min_samples=min_samples)
    for i in range(60):
        ref = _reference(queries[i], [query_cells[i]], emb, cells, latlon, k, min_samples=min_samples)
        if ref is None:
            assert query_cells[i] == EMPTY_CELL
            assert not res.found[i] and np.isnan(res.latlon_deg[i]).all()
            assert (res.rows[i] == -1).all()
            continue
        mean, top = ref
        assert res.found[i]
        assert index.ids[res.rows[i][res.rows[i] >= 0]].tolist() == [f"bg{j}" for j in top]
        assert np.allclose(res.latlon_deg[i], mean, atol=1e-9)
        assert res.cluster_size[i] == res.members[i].sum() >= 1
    assert (~res.found).any() and res.found.any()


def test_top_cells_search_the_union(background):
    index, emb, cells, latlon = background
    queries = _queries(30, seed=5)
    top = np.random.default_rng(6).integers(0, N_CELLS, size=(30, 3))
    res = search_within_cell(queries, top, index, k=10)
    for i in range(30):
        mean, rows = _reference(queries[i], top[i], emb, cells, latlon, 10)
        assert index.ids[res.rows[i]].tolist() == [f"bg{j}" for j in rows]
        assert np.allclose(res.latlon_deg[i], mean, atol=1e-9)
    # Similarities arrive sorted, most similar first.
    assert (np.diff(res.similarities, axis=1) <= 1e-6).all()


def test_no_cell_and_empty_cell_are_not_found(background):
    index = background[0]
    res = search_within_cell(_queries(3), np.array([-1, EMPTY_CELL, 0]), index)
    assert res.found.tolist() == [False, False, True]
    assert np.isnan(res.latlon_deg[:2]).all()
    assert res.cluster_size[:2].tolist() == [0, 0]


def test_torch_queries_give_the_same_answer(background):
    index = background[0]
    queries = _queries(20, seed=9)
    query_cells = np.arange(20) % N_CELLS
    from_numpy = search_within_cell(queries, query_cells, index)
    from_torch = search_within_cell(torch.from_numpy(queries), torch.from_numpy(query_cells), index)
    assert np.array_equal(from_numpy.rows, from_torch.rows)
    assert np.allclose(from_numpy.latlon_deg, from_torch.latlon_deg, equal_nan=True)


def test_nearest_background_is_the_global_argmax(background):
    index, emb, cells, latlon = background
    queries = _queries(40, seed=11)
    res = nearest_background(queries, index, k=3)
    best = np.argmax(queries @ emb.T, axis=1)
    assert index.ids[res.rows[:, 0]].tolist() == [f"bg{j}" for j in best]
    assert np.allclose(res.latlon_deg, latlon[best])
    assert res.found.all()


def test_bad_k_raises(background):
    with pytest.raises(ValueError, match="k must be"):
        search_within_cell(_queries(1), np.array([0]), background[0], k=0)
