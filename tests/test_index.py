import subprocess
import sys

import numpy as np
import pytest
import torch

from geoswc.retrieval.index import BackgroundIndex, recall_at_k


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _world(n=600, dim=16, n_cells=40, seed=0):
    rng = np.random.default_rng(seed)
    cell_idx = rng.integers(0, n_cells, size=n)
    cell_idx[cell_idx == 7] = 8  # cell 7 holds no background photo
    cell_idx[np.flatnonzero(cell_idx == 3)[1:]] = 4  # cell 3 holds exactly one
    emb = _normalise(rng.normal(size=(n, dim)))
    latlon = np.stack([rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)], axis=1)
    ids = [f"img{i}" for i in range(n)]
    return emb, cell_idx, latlon, ids, n_cells


def _reference_within_cells(index, queries, cells, k):
    """Brute force over the index's rows whose cell is one of the query's cells (float32 of stored values)."""
    stored = np.asarray(index.embeddings, dtype=np.float32)
    sims = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    for i, qc in enumerate(np.atleast_2d(cells.T).T if cells.ndim == 1 else cells):
        cand = np.flatnonzero(np.isin(index.cell_idx, np.atleast_1d(qc)))
        s = stored[cand] @ queries[i]
        best = np.argsort(-s, kind="stable")[:k]
        sims[i, : len(best)], rows[i, : len(best)] = s[best], cand[best]
    return sims, rows


@pytest.fixture
def built(tmp_path):
    emb, cell_idx, latlon, ids, n_cells = _world()
    source = np.lib.format.open_memmap(tmp_path / "src.npy", mode="w+", dtype=np.float16, shape=emb.shape)
    source[:] = emb
    index = BackgroundIndex(chunk_size=64).build(
        np.load(tmp_path / "src.npy", mmap_mode="r"),
        cell_idx=cell_idx,
        latlon=latlon,
        ids=ids,
        n_cells=n_cells,
        fingerprint="fp1",
        directory=tmp_path / "idx",
        config={"retrieval": {"index_dtype": "float16"}},
    )
    return index, emb, cell_idx, latlon, ids


def test_build_sorts_by_cell_with_offsets_and_keeps_metadata(built):
    index, emb, cell_idx, latlon, ids = built
    assert index.embeddings.dtype == np.float16 and len(index) == len(emb)
    assert (np.diff(index.cell_idx) >= 0).all()
    np.testing.assert_array_equal(index.cell_sizes(), np.bincount(cell_idx, minlength=40))
    for c in (0, 3, 7, 39):
        assert (index.cell_idx[index.offsets[c] : index.offsets[c + 1]] == c).all()
    original = np.array([int(i[3:]) for i in index.ids])  # rows keep their own id, coordinates, embedding
    np.testing.assert_array_equal(index.latlon, latlon[original])
    np.testing.assert_array_equal(index.cell_idx, cell_idx[original])
    np.testing.assert_allclose(index.embeddings, emb[original], atol=1e-3)


def test_save_load_memory_mapped_roundtrip(built, tmp_path):
    index, *_ = built
    loaded = BackgroundIndex.load(tmp_path / "idx")
    assert isinstance(loaded.embeddings, np.memmap)
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    np.testing.assert_array_equal(loaded.offsets, index.offsets)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    assert loaded.fingerprint == "fp1" and loaded.config == {"retrieval": {"index_dtype": "float16"}}
    index.save(tmp_path / "copy")
    in_ram = BackgroundIndex.load(tmp_path / "copy", mmap=False)
    assert not isinstance(in_ram.embeddings, np.memmap)
    np.testing.assert_array_equal(in_ram.latlon, index.latlon)


@pytest.mark.parametrize("k", [1, 5, 30])
def test_search_cells_matches_brute_force(built, k):
    index, *_ = built
    rng = np.random.default_rng(1)
    queries = _normalise(rng.normal(size=(50, 16)))
    cells = rng.integers(0, 40, size=50)
    cells[:3] = [7, 3, -1]  # empty cell, single-photo cell, no cell
    sims, rows = index.search_cells(queries, cells, k)
    ref_sims, ref_rows = _reference_within_cells(index, queries, cells, k)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-5, atol=1e-6)
    assert (rows[0] == -1).all() and np.isneginf(sims[0]).all()
    assert rows[1, 0] >= 0 and (rows[1, 1:] == -1).all()
    assert (rows[2] == -1).all()


def test_search_several_cells_per_query_matches_brute_force(built):
    index, *_ = built
    rng = np.random.default_rng(2)
    queries = _normalise(rng.normal(size=(30, 16)))
    cells = rng.integers(0, 40, size=(30, 3))
    cells[0] = [5, 5, 7]  # duplicate and empty cells
    sims, rows = index.search_cells(queries, cells, 8)
    ref_sims, ref_rows = _reference_within_cells(index, queries, cells, 8)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-5, atol=1e-6)
    assert len(set(rows[0][rows[0] >= 0])) == (rows[0] >= 0).sum()


def test_search_cells_torch_matches_numpy(built):
    index, *_ = built
    rng = np.random.default_rng(3)
    queries = _normalise(rng.normal(size=(40, 16)))
    cells = rng.integers(-1, 40, size=(40, 2))
    sims, rows = index.search_cells(queries, cells, 6)
    t_sims, t_rows = index.search_cells(torch.from_numpy(queries), torch.from_numpy(cells), 6)
    assert isinstance(t_rows, torch.Tensor)
    np.testing.assert_array_equal(t_rows.numpy(), rows)
    np.testing.assert_allclose(t_sims.numpy(), sims, rtol=1e-5, atol=1e-6)


def test_search_cells_errors(built, tmp_path):
    index, *_ = built
    q = np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match="cell_idx 40 out of range"):
        index.search_cells(q, np.array([0, 40]), 3)
    with pytest.raises(ValueError, match="16-dimensional.*8-dimensional"):
        index.search_cells(np.zeros((2, 8), np.float32), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search_cells(q, np.array([0, 1]), 0)
    with pytest.raises(ValueError, match="partition 'fp1'.*'other'"):
        BackgroundIndex.load(tmp_path / "idx", fingerprint="other")
    with pytest.raises(FileNotFoundError):
        BackgroundIndex.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype 'int8'; choose one of: float16, float32"):
        BackgroundIndex(dtype="int8")
    emb, cell_idx, latlon, ids, _ = _world(n=20)
    with pytest.raises(ValueError, match="cell_idx 39 out of range"):
        BackgroundIndex().build(
            emb, cell_idx=cell_idx * 0 + 39, latlon=latlon, ids=ids, n_cells=39, fingerprint="f"
        )
    with pytest.raises(ValueError, match="search mode 'hnsw'"):
        index.search(q, 3, mode="hnsw")


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_global_flat_search_matches_brute_force(built, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    index, *_ = built
    queries = _normalise(np.random.default_rng(4).normal(size=(25, 16)))
    sims, rows = index.search(queries, 10, backend=backend)
    stored = np.asarray(index.embeddings, np.float32)
    ref = stored @ queries.T
    ref_sims = -np.sort(-ref, axis=0)[:10].T
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ref.T, rows, axis=1), sims, rtol=1e-4, atol=1e-5)


def test_binary_codes_numpy_and_faiss_agree_with_hamming_reference(built):
    index, *_ = built
    queries = _normalise(np.random.default_rng(5).normal(size=(12, 16)))
    sims, rows = index.search(queries, 5, mode="binary", backend="numpy")
    bits = np.asarray(index.embeddings, np.float32) > 0
    ham = (bits[None, :, :] != (queries > 0)[:, None, :]).sum(axis=2)
    np.testing.assert_array_equal(np.sort(ham, axis=1)[:, :5], np.round((1 - sims) * 16 / 2).astype(int))
    np.testing.assert_array_equal(np.take_along_axis(ham, rows, axis=1), np.sort(ham, axis=1)[:, :5])
    pytest.importorskip("faiss")
    f_sims, _ = index.search(queries, 5, mode="binary", backend="faiss")
    np.testing.assert_allclose(f_sims, sims)


def _clustered_index_and_exact():
    rng = np.random.default_rng(6)
    n_cells, dim = 50, 32
    centres = rng.normal(size=(n_cells, dim))
    cell_idx = rng.integers(0, n_cells, 3000)
    emb = _normalise(centres[cell_idx] + 0.5 * rng.normal(size=(3000, dim)))
    index = BackgroundIndex().build(
        emb, cell_idx=cell_idx, latlon=np.zeros((3000, 2)), ids=range(3000), n_cells=n_cells, fingerprint="f"
    )
    queries = _normalise(centres[rng.integers(0, n_cells, 100)] + 0.5 * rng.normal(size=(100, dim)))
    _, exact = index.search(queries, 10, backend="numpy")
    return index, queries, exact


def test_compact_modes_recall_on_clustered_embeddings():
    pytest.importorskip("faiss")
    index, queries, exact = _clustered_index_and_exact()
    assert recall_at_k(index.search(queries, 10, mode="sq8")[1], exact) > 0.9
    assert recall_at_k(index.search(queries, 10, mode="ivf", nlist=16, nprobe=16)[1], exact) > 0.99
    assert recall_at_k(index.search(queries, 10, mode="binary")[1], exact) > 0.2
    assert recall_at_k(exact, exact) == 1.0


@pytest.mark.slow
def test_pq_mode_recall_on_clustered_embeddings():
    pytest.importorskip("faiss")
    index, queries, exact = _clustered_index_and_exact()
    assert (
        recall_at_k(index.search(queries, 10, mode="pq", pq_m=8, pq_bits=4, train_size=1000)[1], exact) > 0.2
    )


def test_geoswc_imports_and_searches_without_faiss(tmp_path):
    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "import numpy as np, geoswc, geoswc.retrieval.index as m\n"
        "x = np.eye(8, dtype=np.float32)\n"
        "idx = m.BackgroundIndex().build(x, cell_idx=np.arange(8) % 2, latlon=np.zeros((8, 2)), ids=range(8),"
        " n_cells=2, fingerprint='f')\n"
        "print(idx.search(x[:2], 1)[1].ravel().tolist(), idx.search_cells(x[:2], np.array([0, 0]), 1)[1].ravel().tolist())\n"
        "try:\n    idx.search(x, 1, mode='sq8')\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    # cell 0 holds e0, e2, e4, e6 (rows 0-3), cell 1 the odd ones (rows 4-7); ties keep the first row
    assert lines[0] == "[0, 4] [0, 0]"
    assert 'pip install "geoswc[faiss]"' in lines[1]
