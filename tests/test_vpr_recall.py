"""recall@N, the test-time methods and the distance measures (geoswc.eval.vpr, geoswc.vpr.search).

The oracle test feeds the descriptors our pipeline computes (tiny preset's real ImageNet backbone + GeM on the
street world) through the benchmark's own ``test.test`` (Berton et al., CVPR 2022, from ../shared: its
``BaseDataset`` reads the folder and finds the positives itself, faiss ``IndexFlatL2`` searches, its loops
merge crops and vote) and requires the same recall@1/5/10/20 as ours for every query test method.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from vpr_fixtures import benchmark_root, load_benchmark_module, make_tiny_world

from geoswc.data.vpr import read_split
from geoswc.eval.vpr import median_best_of_k_m, median_top1_m, recall_at
from geoswc.street.embed import Embedder, views
from geoswc.street.model import off_the_shelf
from geoswc.vpr.search import database_index, rank

SIZE = (48, 64)


def test_recall_by_hand():
    predictions = np.array([[5, 1, 2], [7, 8, 9], [3, 4, 0]])
    positives = [np.array([1]), np.array([], dtype=int), np.array([3, 0])]
    # q0 first right at rank 2, q1 never (no positive: still in the denominator), q2 at rank 1
    assert recall_at(predictions, positives, [1, 2, 3]) == {
        1: pytest.approx(100 / 3),
        2: pytest.approx(200 / 3),
        3: pytest.approx(200 / 3),
    }
    with pytest.raises(ValueError, match=">= 1"):
        recall_at(predictions, positives, [0])


def test_distances_by_hand():
    d = np.array([[30.0, 10.0, 50.0], [5.0, 40.0, 1.0], [100.0, 90.0, 80.0]])
    assert median_top1_m(d) == 30.0
    best = median_best_of_k_m(d, 4)
    # best-of-1: 30, 5, 100 -> 30; best-of-2: 10, 5, 90 -> 10; best-of-3: 10, 1, 80 -> 10; k=4 repeats k=3
    assert best == [30.0, 10.0, 10.0, 10.0]


def test_views_shapes():
    photo = np.zeros((60, 100, 3), np.uint8)
    assert views(photo, "hard_resize", SIZE)[0].shape == (48, 64, 3)
    assert views(photo, "central_crop", SIZE)[0].shape == (48, 64, 3)
    crops = views(photo, "five_crops", SIZE)
    assert len(crops) == 5 and all(c.shape == (48, 48, 3) for c in crops)


def test_voting_prefers_what_several_crops_find():
    """Crop 0 ranks row 0 first, but crops 1-4 all rank row 1 first: voting must put row 1 first, while the
    nearest crop keeps row 0 (the single closest)."""
    db = np.eye(4, dtype=np.float32)
    crops = np.stack(
        [[0.99, 0.1, 0, 0], [0.3, 0.95, 0, 0], [0.3, 0.95, 0.01, 0], [0.3, 0.95, 0, 0.01], [0.3, 0.95, 0, 0]]
    )
    crops = (crops / np.linalg.norm(crops, axis=1, keepdims=True)).astype(np.float32)[None]
    index = database_index(db)
    assert rank(index, crops, 2, method="nearest_crop")[0, 0] == 0
    assert rank(index, crops, 2, method="maj_voting", majority_weight=0.5)[0, 0] == 1


@pytest.fixture(scope="module")
def world_descriptors(tmp_path_factory):
    world = make_tiny_world(tmp_path_factory.mktemp("streets") / "w")
    split = read_split(world, "test")
    embedder = Embedder(off_the_shelf(preset="tiny", pool="gem"), size=SIZE, progress=False)
    db = embedder.descriptors([split.folder / p for p in split.database])
    paths = [split.folder / p for p in split.queries]
    queries = {m: embedder.descriptors(paths, m) for m in ("hard_resize", "five_crops", "nearest_crop")}
    return world, split, db, queries


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("method", ["hard_resize", "five_crops", "nearest_crop", "maj_voting"])
def test_recall_matches_benchmark_test_py(world_descriptors, shared_reference, method, monkeypatch):
    world, split, db, queries = world_descriptors
    # numpy 2 removed np.in1d, which test.py calls on 1-D arrays; np.isin is its documented replacement.
    monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    root = benchmark_root(shared_reference)
    bench_ds = load_benchmark_module(root, "datasets_ws.py", "vpr_bench_datasets_ws")
    bench_test = load_benchmark_module(root, "test.py", "vpr_bench_test")
    per_query = queries["hard_resize"] if method == "hard_resize" else queries["nearest_crop"]

    class Precomputed(bench_ds.BaseDataset):
        """Their dataset (their file reading and positives), serving our descriptors instead of pixels."""

        def __getitem__(self, index):
            if index < self.database_num:
                return torch.from_numpy(db[index]), index
            return torch.from_numpy(per_query[index - self.database_num]), index

    args = types.SimpleNamespace(
        resize=list(SIZE),
        test_method=method,
        val_positive_dist_threshold=25,
        efficient_ram_testing=False,
        num_workers=0,
        infer_batch_size=4,
        device="cpu",
        features_dim=db.shape[1],
        recall_values=[1, 5, 10, 20],
        majority_weight=0.01,
    )
    eval_ds = Precomputed(args, str(world.parent), world.name, "test")
    theirs, _ = bench_test.test(args, eval_ds, torch.nn.Identity(), method)

    ours_queries = queries["five_crops"] if method == "five_crops" else per_query
    if method == "maj_voting":
        ours_queries = queries["nearest_crop"]
    predictions = rank(database_index(db), ours_queries, 20, method=method)
    ours = recall_at(predictions, split.positives(25.0), [1, 5, 10, 20])
    assert [sorted(p) for p in eval_ds.get_positives()] == [list(p) for p in split.positives(25.0)]
    assert list(ours.values()) == pytest.approx(list(theirs), abs=1e-9)
    assert 0 < ours[20] and ours[1] < 100  # a split where the measure can fail
