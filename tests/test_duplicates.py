"""Near-duplicate groups (`geoswc.similar.duplicate_groups`, ``geoswc tag --duplicates``) against scipy's
connected components and against photos copied, re-encoded and resized."""

import numpy as np
import pytest
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from geoswc.cli import main
from geoswc.similar import DUPLICATE_THRESHOLD, duplicate_groups
from geoswc.tag_output import read_rows


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_groups_are_the_connected_components_of_the_similarity_graph():
    rng = np.random.default_rng(0)
    base = unit(rng.normal(size=(40, 16)))
    # Near-copies of a few photos, and a chain a ~ b ~ c whose ends are not similar enough on their own.
    copies = unit(base[[3, 3, 10, 25]] + rng.normal(scale=0.02, size=(4, 16)))
    direction = unit(rng.normal(size=(1, 16)))[0]
    chain = unit(np.stack([base[30] + t * direction for t in (0.25, 0.5)]))
    vectors = np.concatenate([base, copies, chain]).astype(np.float16)
    threshold = 0.97
    groups = duplicate_groups(vectors, threshold=threshold, block=7)  # blocks cut through the pairs

    sims = vectors.astype(np.float32) @ vectors.astype(np.float32).T
    ii, jj = np.nonzero(np.triu(sims >= threshold, k=1))
    graph = coo_matrix((np.ones(len(ii)), (ii, jj)), shape=(len(vectors),) * 2)
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    # Same partition (ids aside); singletons get 0.
    assert np.array_equal(groups == 0, sizes[labels] == 1)
    grouped = np.flatnonzero(groups)
    for i in grouped:
        assert set(np.flatnonzero(groups == groups[i])) == set(np.flatnonzero(labels == labels[i]))
    # Ids count from 1 in order of each group's first photo.
    firsts = [np.flatnonzero(groups == g)[0] for g in range(1, groups.max() + 1)]
    assert firsts == sorted(firsts)
    assert groups[3] == groups[40] == groups[41] and groups[10] == groups[42] and groups[25] == groups[43]


def test_threshold_is_checked():
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\], got 1.5"):
        duplicate_groups(np.eye(3, dtype=np.float32), threshold=1.5)
    assert duplicate_groups(np.zeros((0, 4), np.float32)).tolist() == []


def scene(seed, size=(96, 72)):
    """A picture of smooth colour blocks (photo-like: re-encoding and resizing keep it recognisable)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def test_tag_groups_copied_reencoded_and_resized_photos(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "archive"
    root.mkdir()
    for seed in range(4):
        scene(seed).save(root / f"view{seed}.jpg", quality=95)
    (root / "view0_copy.jpg").write_bytes((root / "view0.jpg").read_bytes())
    Image.open(root / "view0.jpg").save(root / "view0_reencoded.jpg", quality=60)
    Image.open(root / "view0.jpg").resize((72, 54)).save(root / "view0_small.jpg", quality=90)
    scene(2).save(root / "view2_scan.png")  # the same view in another format
    out = tmp_path / "tags.parquet"
    args = [
        "tag",
        str(root),
        "--model",
        str(tiny_model_dir),
        "-o",
        str(out),
        "--workers",
        "0",
        "--duplicates",
    ]
    assert main(args) == 0
    assert "6 photos in 2 near-duplicate groups" in capsys.readouterr().out
    groups = {row["path"].rsplit("/", 1)[1]: row["duplicate_group"] for row in read_rows(str(out), "parquet")}
    first = {groups[n] for n in ("view0.jpg", "view0_copy.jpg", "view0_reencoded.jpg", "view0_small.jpg")}
    assert len(first) == 1 and None not in first
    assert groups["view2.jpg"] == groups["view2_scan.png"] not in (None, *first)
    assert groups["view1.jpg"] is None and groups["view3.jpg"] is None
    assert DUPLICATE_THRESHOLD == 0.95  # the documented default (docs/tagging.md)
