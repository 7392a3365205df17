"""`geoswc similar` and the archive embeddings a tag run keeps, against brute-force cosine similarity."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_model
from geoswc.cli import main
from geoswc.geolocator import Geolocator
from geoswc.tagging.similar import find_similar, load_embeddings, search


def scene(seed, size=(96, 72)):
    """A picture of smooth colour blocks (photo-like: re-encoding and resizing keep it recognisable)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def test_search_matches_brute_force_over_blocks(tmp_path):
    rng = np.random.default_rng(1)
    archive = rng.normal(size=(257, 12))
    archive /= np.linalg.norm(archive, axis=1, keepdims=True)
    archive[100] = archive[7]  # a tie: the lower row comes first
    np.save(tmp_path / "a.npy", archive.astype(np.float16))
    vectors = np.load(tmp_path / "a.npy", mmap_mode="r")
    queries = np.concatenate([archive[[7, 50]], rng.normal(size=(3, 12))])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows, sims = search(queries, vectors, top=5, block=64)
    brute = queries.astype(np.float32) @ np.asarray(vectors, dtype=np.float32).T
    for q in range(len(queries)):
        expected = sorted(range(len(archive)), key=lambda r: (-brute[q, r], r))[:5]
        assert rows[q].tolist() == expected
        np.testing.assert_allclose(sims[q], brute[q, expected], rtol=1e-6)
    assert rows[0, :2].tolist() == [7, 100]
    rows, _ = search(queries, vectors[:3], top=10)
    assert rows.shape == (5, 3)  # no more matches than photos
    with pytest.raises(ValueError, match="top must be at least 1"):
        search(queries, vectors, top=0)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, tiny_model_dir):
    """An archive of five views tagged with the tiny model, and a query folder."""
    base = tmp_path_factory.mktemp("similar")
    root, queries = base / "archive", base / "queries"
    root.mkdir()
    queries.mkdir()
    for seed in range(5):
        scene(seed).save(root / f"view{seed}.jpg", quality=95)
    Image.open(root / "view3.jpg").resize((80, 60)).save(queries / "view3_small.jpg", quality=70)
    scene(1).save(queries / "view1.png")
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = base / "tags.csv"
    assert main(["tag", str(root), "--model", str(tiny_model_dir), "-o", str(out), "--workers", "0"]) == 0
    return root, queries, out


def test_similar_lists_the_archive_best_first_like_brute_force(tagged, tiny_model_dir, tmp_path, capsys):
    root, queries, out = tagged
    result = tmp_path / "similar.csv"
    args = ["similar", str(queries), "--model", str(tiny_model_dir), "--archive", str(out), "-o", str(result)]
    assert main([*args, "--top", "3"]) == 0
    assert f"3 queries, 6 matches in {result} (1 unreadable queries)" in capsys.readouterr().out
    with open(result, newline="") as f:
        rows = list(csv.DictReader(f))
    model = Geolocator.from_pretrained(tiny_model_dir)
    archive = sorted(str(p) for p in root.iterdir())
    with torch.inference_mode():

        def embed(path):
            return model.embed(model.features(model.load_pixels(path)[None])).numpy()[0]

        reference = np.stack([embed(p) for p in archive])
        for query in ("view1.png", "view3_small.jpg"):
            got = [r for r in rows if r["query"].endswith(query)]
            sims = reference @ embed(str(queries / query))
            expected = np.argsort(-sims, kind="stable")[:3]
            assert [r["path"] for r in got] == [archive[i] for i in expected]
            assert [int(r["rank"]) for r in got] == [1, 2, 3]
            np.testing.assert_allclose([float(r["similarity"]) for r in got], sims[expected], atol=3e-3)
    assert [r for r in rows if r["query"].endswith("view3_small.jpg")][0]["path"].endswith("view3.jpg")
    assert [r for r in rows if r["query"].endswith("view1.png")][0]["path"].endswith("view1.jpg")
    broken = [r for r in rows if r["query"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["path"] == ""
    # The archive rows' positions come along.
    tagged_rows = {r["path"]: r for r in csv.DictReader(open(out, newline=""))}
    assert all(r["lat"] == tagged_rows[r["path"]]["lat"] for r in rows if r["path"])


def test_similar_refuses_an_archive_of_another_model(tagged, tmp_path):
    _, queries, out = tagged
    other = build_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="tagged with another model"):
        find_similar([str(queries)], model=str(other), archive=str(out))
    with pytest.raises(FileNotFoundError, match="no archive embeddings"):
        find_similar([str(queries)], model=str(other), archive=str(tmp_path / "nothing.csv"))


def test_kept_embeddings_follow_the_rows(tagged):
    _, _, out = tagged
    kept = load_embeddings(str(out))
    rows = list(csv.DictReader(open(out, newline="")))
    assert kept.paths == [r["path"] for r in rows if r["status"] == "ok"]
    assert kept.vectors.dtype == np.float16 and isinstance(kept.vectors, np.memmap)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(kept.vectors, np.float32), axis=1), 1.0, atol=2e-3)
