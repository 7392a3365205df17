import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.cluster import DBSCAN

from geoswc.eval import haversine_km
from geoswc.geolocator import Geolocator
from geoswc.retrieval.index import BackgroundIndex
from geoswc.swc import spherical_mean
from geoswc.swc.cluster import EARTH_RADIUS_KM


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Geolocator.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(4)
    # Different aspect ratios: the longest-side resize gives different tensor shapes.
    sizes = [(48, 64), (64, 48), (48, 64), (60, 60), (30, 64), (48, 64)]
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _features(model, images):
    return torch.cat([model.features(model.load_pixels(im)[None]) for im in images])


def test_model_folder_layout(tiny_model_dir):
    names = {p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*")}
    for required in (
        "config.yaml",
        "cells/geocells.json",
        "backbone.safetensors",
        "backbone.json",
        "heads/ce.safetensors",
        "heads/hc.safetensors",
        "heads/mvmf.safetensors",
        "retrieval.safetensors",
        "index/index.json",
        "geolocator.json",
    ):
        assert required in names
    meta = json.loads((tiny_model_dir / "geolocator.json").read_text())
    assert meta["heads"] == ["ce", "hc", "mvmf"] and meta["backbone"] == "test_efficientnet"


def test_round_trip_gives_identical_predictions(model, images, tmp_path):
    model.save_pretrained(tmp_path / "copy")
    again = Geolocator.from_pretrained(tmp_path / "copy", device="cpu")
    assert again.fingerprint == model.fingerprint
    for mode in ("swc", "cell", "rrm"):
        assert again.predict(images, mode=mode) == model.predict(images, mode=mode)


def test_swc_matches_manual_composition(model, images):
    feats = _features(model, images)
    emb = model.retrieval(feats).numpy()
    head = model.heads["ce"]
    best_cell = head.fine_log_probs(head(feats)).argmax(1).numpy()
    index = model.index
    stored = np.asarray(index.embeddings, dtype=np.float32)
    records = model.predict(images, head="ce", mode="swc")
    assert {r["method"] for r in records} <= {"swc", "fallback"}
    for i, rec in enumerate(records):
        assert rec["cell_idx"] == best_cell[i]
        assert rec["cell_token"] == model.geocells.fine.tokens[best_cell[i]]
        in_cell = np.flatnonzero(index.cell_idx == best_cell[i])
        if len(in_cell) == 0:
            assert rec["method"] == "fallback" and rec["neighbours"] == []
            centre = model.geocells.fine.centers_deg[best_cell[i]]
            assert (rec["lat"], rec["lon"]) == pytest.approx(tuple(centre))
            continue
        top = in_cell[np.argsort(-(stored[in_cell] @ emb[i]), kind="stable")[:10]]
        assert [n["id"] for n in rec["neighbours"]] == index.ids[top].tolist()
        pts = index.latlon[top]
        labels = (
            DBSCAN(eps=1 / EARTH_RADIUS_KM, min_samples=1, metric="haversine").fit(np.radians(pts)).labels_
        )
        counts = np.bincount(labels)
        chosen = pts[labels == labels[np.flatnonzero(counts[labels] == counts.max())[0]]]
        expected = spherical_mean(chosen[None], np.ones((1, len(chosen))))[0]
        assert (rec["lat"], rec["lon"]) == pytest.approx(tuple(expected), abs=1e-6)
        assert sum(n["in_cluster"] for n in rec["neighbours"]) == len(chosen)


def test_cell_mode_is_the_head_prediction(model, images):
    feats = _features(model, images)
    for kind in ("ce", "hc", "mvmf"):
        head = model.heads[kind]
        expected = head.predict_latlon(head(feats)).numpy()
        records = model.predict(images, head=kind, mode="cell")
        got = np.array([[r["lat"], r["lon"]] for r in records])
        assert np.allclose(got, expected)
        assert all(r["method"] == "cell" and r["head"] == kind for r in records)


def test_confidence_is_probability_mass_within_25_km(model, images):
    feats = _features(model, images)
    head = model.heads["hc"]
    probs = torch.softmax(head.fine_log_probs(head(feats)), dim=1).numpy()
    centers = np.asarray(model.geocells.fine.centers_deg)
    records = model.predict(images, head="hc", mode="cell")
    some_neighbours = False
    for i, rec in enumerate(records):
        best = probs[i].argmax()
        d = haversine_km(centers[best, 0], centers[best, 1], centers[:, 0], centers[:, 1])
        assert rec["confidence"] == pytest.approx(probs[i][d <= 25].sum(), rel=1e-5)
        assert rec["cell_prob"] == pytest.approx(probs[i, best], rel=1e-5)
        assert [c["prob"] for c in rec["top_cells"]] == pytest.approx(np.sort(probs[i])[::-1][:5], rel=1e-5)
        some_neighbours |= (d <= 25).sum() > 1
    assert some_neighbours, "the fixture should have cells with neighbours within 25 km"


def test_rrm_is_the_global_nearest_background_photo(model, images):
    emb = model.retrieval(_features(model, images)).numpy()
    best = np.argmax(emb @ np.asarray(model.index.embeddings, dtype=np.float32).T, axis=1)
    records = model.predict(images, mode="rrm")
    assert [r["neighbours"][0]["id"] for r in records] == model.index.ids[best].tolist()
    assert np.allclose([[r["lat"], r["lon"]] for r in records], model.index.latlon[best])


def test_fallback_when_the_cell_holds_no_background_photo(model, images):
    feats = _features(model, images)
    head = model.heads["mvmf"]
    cells = head.fine_log_probs(head(feats)).argmax(1).numpy()
    # An index whose only photos lie in a cell none of the photos is predicted to.
    other = next(c for c in range(len(model.geocells.fine)) if c not in cells)
    index = BackgroundIndex().build(
        np.asarray(model.index.embeddings[:3], dtype=np.float32),
        cell_idx=[other] * 3,
        latlon=model.index.latlon[:3],
        ids=["a", "b", "c"],
        n_cells=len(model.geocells.fine),
        fingerprint=model.fingerprint,
    )
    narrow = Geolocator(
        backbone=model.backbone,
        geocells=model.geocells,
        heads=dict(model.heads),
        retrieval=model.retrieval,
        index=index,
        config=model.config,
        backbone_name=model.backbone_name,
        data_config=model.data_config,
    )
    out = narrow.locate(feats, head="mvmf", mode="swc")
    assert (out.method == "fallback").all()
    assert np.allclose(out.latlon_deg, head.predict_latlon(head(feats)).numpy())
    # Searching the top cells instead of one reaches the populated cell.
    wide = narrow.locate(feats, head="mvmf", mode="swc", top_cells=len(model.geocells.fine))
    assert (wide.method == "swc").all()


def test_predict_batches_by_shape_and_keeps_order(model, images, tmp_path):
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    one_by_one = [model.predict([p])[0] for p in paths]
    batched = model.predict(paths, batch_size=2)
    # Batch composition changes float rounding in the convolutions, nothing else.
    assert [r["cell_idx"] for r in batched] == [r["cell_idx"] for r in one_by_one]
    assert [r["method"] for r in batched] == [r["method"] for r in one_by_one]
    assert np.allclose([[r["lat"], r["lon"]] for r in batched], [[r["lat"], r["lon"]] for r in one_by_one])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        model.predict([tmp_path / "nope.jpg"])


def test_default_head_is_the_papers_best_mvmf_then_ce(model, images):
    # Table 1 of the paper: MvMF + Search within Cell is the best system; without MvMF, CE (PlaNet) before HC.
    assert model.predict(images[:1])[0]["head"] == "mvmf"
    heads = dict(model.heads)
    try:
        del model.heads["mvmf"]
        assert model.resolve_head() == "ce"
        del model.heads["ce"]
        assert model.resolve_head() == "hc"
    finally:
        model.heads.clear()
        model.heads.update(heads)


@pytest.mark.parametrize(
    "kwargs, match", [({"head": "vmf"}, "ce, hc, mvmf"), ({"mode": "knn"}, "swc, cell, rrm")]
)
def test_bad_choices_name_the_valid_ones(model, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.predict(images[:1], **kwargs)


def test_mismatched_fingerprint_is_refused(model, tiny_model_dir, tmp_path):
    from geoswc.classifiers import save_head

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    # Checksums are verified before any part is read; without them the fingerprints must still be checked.
    meta = json.loads((broken / "geolocator.json").read_text())
    del meta["sha256"]
    (broken / "geolocator.json").write_text(json.dumps(meta))
    head = model.heads["ce"]
    original = head.fingerprint
    head.fingerprint = "0123456789abcdef"
    try:
        save_head(head, broken / "heads" / "ce.safetensors")
    finally:
        head.fingerprint = original
    with pytest.raises(ValueError, match="0123456789abcdef.*" + model.fingerprint):
        Geolocator.from_pretrained(broken, device="cpu")

    shutil.copy(tiny_model_dir / "heads" / "ce.safetensors", broken / "heads" / "ce.safetensors")
    meta = json.loads((broken / "index" / "index.json").read_text())
    meta["fingerprint"] = "fedcba9876543210"
    (broken / "index" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fedcba9876543210.*" + model.fingerprint):
        Geolocator.from_pretrained(broken, device="cpu")


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="geolocator.json"):
        Geolocator.from_pretrained(tmp_path / "none")
