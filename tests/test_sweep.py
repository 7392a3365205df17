"""The evaluation store and `geoswc sweep`: the last stages re-run without the backbone."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoswc.cli import main
from geoswc.geolocator import Geolocator
from geoswc.retrieval.index import BackgroundIndex
from geoswc.evaluation.sweep import EvalStore, Replayer, Setting, sweep_grid


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    """`geoswc evaluate` on six readable photos and one missing one."""
    root = tmp_path_factory.mktemp("sweep")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    ids = [f"p{i}.jpg" for i in range(6)]
    for img_id, (h, w) in zip(ids, [(48, 64), (64, 48), (60, 60), (48, 64), (40, 64), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(images / img_id)
    truth = pd.DataFrame(
        {
            "IMG_ID": ids + ["missing.jpg"],
            "LAT": [48.86, 40.71, 35.68, -33.87, 51.51, 41.9, 37.77],
            "LON": [2.35, -74.0, 139.69, 151.21, -0.13, 12.5, -122.42],
        }
    )
    truth.to_csv(root / "test.csv", index=False)
    out = root / "eval"
    args = ["--model", str(tiny_model_dir), "--meta", str(root / "test.csv"), "--images", str(images)]
    assert main(["evaluate", *args, "-o", str(out), "--workers", "0"]) == 0
    return out, truth, images


def test_store_keeps_what_the_networks_computed(evaluated, tiny_model_dir):
    out, truth, images = evaluated
    store = EvalStore.load(out)
    model = Geolocator.from_pretrained(tiny_model_dir, device="cpu")
    assert store.meta["fingerprint"] == model.fingerprint
    assert store.ids == truth["IMG_ID"].tolist() and store.evaluated.tolist() == [True] * 6 + [False]
    assert store.features.dtype == np.float16 and store.features.shape == (6, model.backbone.num_features)
    assert store.embeddings.dtype == np.float32 and set(store.heads) == {"ce", "hc", "mvmf"}
    # The same photos through Geolocator.predict (its own decoding and batching).
    paths = [images / i for i in truth["IMG_ID"][:6]]
    for kind in ("ce", "hc", "mvmf"):
        records = model.predict(paths, head=kind, mode="cell")
        assert store.heads[kind].top_cells[:, 0].tolist() == [r["cell_idx"] for r in records]
        expected = np.array([[r["lat"], r["lon"]] for r in records])
        assert np.allclose(store.heads[kind].latlon_deg, expected, atol=1e-4)
        # The 25 km density is the confidence the Geolocator reports (the same cells, the same probabilities).
        assert np.allclose(store.heads[kind].density[:, 1], [r["confidence"] for r in records], atol=1e-5)


def test_results_hold_the_new_metrics(evaluated):
    out, _, _ = evaluated
    results = json.loads((out / "results.json").read_text())
    for mode in ("ce", "hc+rrm"):
        sel = results[mode]["selective"]
        assert sel["localizable"]["n"] + sel["non_localizable"]["n"] == 6
        assert [p["n"] for p in sel["curve"]][:2] == [6, 5]
        assert 0 < results[mode]["geoguessr_score"] < 5000 * 6 / 7
    assert "selective" not in results["rrm"]
    assert set(results["rrm"]["retrieval"]["recall"]) == {"1", "5", "10"}
    report = (out / "report.md").read_text()
    assert "## Selective prediction" in report and "GeoGuessr score" in report
    assert (out / "coverage_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_rows_of_the_model_settings_equal_evaluate(evaluated, tmp_path, capsys):
    out, _, _ = evaluated
    sweep = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            str(out),
            "-o",
            str(sweep),
            "--head",
            "ce",
            "hc",
            "mvmf",
            "none",
            "--k",
            "1",
            "10",
            "--scope",
            "cell",
            "global",
            "--aggregation",
            "largest-cluster-mean",
            "top1",
        ]
    )
    assert code == 0
    assert "paper" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    table = pd.read_csv(sweep / "sweep.csv")
    assert len(table) == 3 * 2 * 2 * 2 + 2 * 2  # head 'none' runs with scope global only
    for head in ("ce", "hc", "mvmf"):
        row = table[
            (table["head"] == head)
            & (table["k"] == 10)
            & (table["scope"] == "cell")
            & (table["aggregation"] == "largest-cluster-mean")
        ]
        assert len(row) == 1 and bool(row["default"].iloc[0]) and bool(row["paper"].iloc[0])
        for radius, value in results[f"{head}+rrm"]["accuracy"].items():
            assert row[f"acc_{radius}km"].iloc[0] == value
        assert row["median_km"].iloc[0] == results[f"{head}+rrm"]["median_km"]
    rrm = table[(table["head"] == "none") & (table["k"] == 1) & (table["aggregation"] == "top1")]
    assert len(rrm) == 1 and bool(rrm["default"].iloc[0])
    for radius, value in results["rrm"]["accuracy"].items():
        assert rrm[f"acc_{radius}km"].iloc[0] == value
    assert (table["ms_per_photo"] > 0).all()
    for parameter in ("head", "k", "scope", "aggregation"):
        assert (sweep / f"sweep_{parameter}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (sweep / "sweep_eps_km.png").exists()
    markdown = (sweep / "sweep.md").read_text()
    assert "paper default" in markdown and "sweep_k.png" in markdown


def _replayer(out, tiny_model_dir):
    store = EvalStore.load(out)
    return store, Replayer(store, BackgroundIndex.load(tiny_model_dir / "index"))


def test_within_cell_top1_is_the_brute_force_nearest_in_the_cell(evaluated, tiny_model_dir):
    out, _, _ = evaluated
    store, replayer = _replayer(out, tiny_model_dir)
    index = replayer.index
    emb = np.asarray(index.embeddings, dtype=np.float32)
    for mode, code in (("exact", lambda x: x), ("binary", lambda x: np.where(x > 0, 1.0, -1.0))):
        done = replayer.run(Setting(head="ce", k=1, aggregation="top1", scope="cell", index_mode=mode))
        for i, cell in enumerate(store.heads["ce"].top_cells[:, 0]):
            lo, hi = index.offsets[cell], index.offsets[cell + 1]
            if hi == lo:
                assert done.method[i] == "fallback"
                assert np.array_equal(done.latlon_deg[i], store.heads["ce"].latlon_deg[i])
                continue
            scores = code(emb[lo:hi]) @ code(store.embeddings[i])
            best = lo + int(np.flatnonzero(scores == scores.max())[0])
            assert done.method[i] == "swc"
            assert np.array_equal(done.latlon_deg[i], index.latlon[best]), (mode, i)


def test_pq_mode_searches_the_product_quantised_vectors(evaluated, tiny_model_dir):
    """index_mode=pq: each decoded sub-vector is one of the codebook's centroids, decoding stays near the
    embedding, and the within-cell top-1 is the brute-force nearest among the decoded rows of the cell."""
    out, _, _ = evaluated
    store, replayer = _replayer(out, tiny_model_dir)
    index = replayer.index
    emb = np.asarray(index.embeddings, dtype=np.float32)
    done = replayer.run(Setting(head="ce", k=1, aggregation="top1", scope="cell", index_mode="pq"))
    import faiss

    pq_index = index.faiss_index("pq")
    decoded = pq_index.reconstruct_n(0, len(index))
    m, dsub = pq_index.pq.M, pq_index.pq.dsub
    centroids = faiss.vector_to_array(pq_index.pq.centroids).astype(np.float32).reshape(m, -1, dsub)
    for j in range(m):  # every decoded sub-vector is a centroid of its sub-space
        sub = decoded[:, j * dsub : (j + 1) * dsub]
        gap = np.abs(sub[:, None, :] - centroids[j][None]).max(axis=2).min(axis=1)
        assert gap.max() < 1e-5
    assert centroids.shape[1] >= 2
    rel = np.linalg.norm(decoded - emb, axis=1) / np.linalg.norm(emb, axis=1)
    assert np.median(rel) < 0.9
    for i, cell in enumerate(store.heads["ce"].top_cells[:, 0]):
        lo, hi = index.offsets[cell], index.offsets[cell + 1]
        if hi == lo:
            assert done.method[i] == "fallback"
            continue
        scores = decoded[lo:hi] @ store.embeddings[i]
        best = lo + int(np.flatnonzero(scores == scores.max())[0])
        assert np.array_equal(done.latlon_deg[i], index.latlon[best]), i


def test_global_binary_search_is_the_brute_force_hamming_nearest(evaluated, tiny_model_dir):
    out, _, _ = evaluated
    store, replayer = _replayer(out, tiny_model_dir)
    index = replayer.index
    done = replayer.run(Setting(head=None, k=1, aggregation="top1", scope="global", index_mode="binary"))
    bits = np.asarray(index.embeddings, dtype=np.float32) > 0
    for i, query in enumerate(store.embeddings > 0):
        hamming = (bits != query).sum(axis=1)
        nearest = np.flatnonzero(hamming == hamming.min())
        assert any(np.array_equal(done.latlon_deg[i], index.latlon[r]) for r in nearest)


def test_grid_checks_its_values(evaluated):
    out, _, _ = evaluated
    store = EvalStore.load(out)
    with pytest.raises(ValueError, match="this store has: ce, hc, mvmf, none"):
        sweep_grid(store, head=["vmf"])
    with pytest.raises(ValueError, match="unknown scope 'cells'"):
        sweep_grid(store, scope=["cells"])
    with pytest.raises(ValueError, match="head 'none' runs only with --scope global"):
        sweep_grid(store, head=["none"], scope=["cell"])
    assert [s.scope for s in sweep_grid(store, head=["hc"], scope=["top3", "global"])] == ["top3", "global"]
