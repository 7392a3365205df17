"""Near-duplicate groups (`geoswc.tagging.duplicates.duplicate_groups`, ``geoswc tag --duplicates``) against scipy's
connected components and against photos copied, re-encoded and resized; the inverted-file method against the
exact one."""

import logging

import numpy as np
import pytest
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import geoswc.tagging.duplicates
from geoswc.cli import main
from geoswc.tagging.similar import DUPLICATE_THRESHOLD, duplicate_groups
from geoswc.tagging.output import read_rows


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


def test_method_and_ivf_settings_are_checked():
    vectors = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"unknown duplicate method 'fast'; choose one of: auto, exact, ivf"):
        duplicate_groups(vectors, method="fast")
    with pytest.raises(ValueError, match="nprobe must be at least 1, got 0"):
        duplicate_groups(vectors, method="ivf", nprobe=0)
    with pytest.raises(ValueError, match="nlist must be at least 1, got 0"):
        duplicate_groups(vectors, method="ivf", nlist=0)
    for method in ("exact", "ivf"):
        assert duplicate_groups(np.zeros((0, 4), np.float32), method=method).tolist() == []
        assert duplicate_groups(np.ones((1, 4), np.float32) / 2, method=method).tolist() == [0]
        assert duplicate_groups(np.ones((2, 4), np.float32) / 2, method=method).tolist() == [1, 1]


def reference_groups(vectors, threshold):
    """scipy's connected components of the full similarity graph, as (grouped mask, labels)."""
    x = np.asarray(vectors, dtype=np.float32)
    ii, jj = np.nonzero(np.triu(x @ x.T >= threshold, k=1))
    graph = coo_matrix((np.ones(len(ii)), (ii, jj)), shape=(len(x),) * 2)
    _, labels = connected_components(graph, directed=False)
    return np.bincount(labels)[labels] >= 2, labels


def same_partition(groups, grouped, labels):
    if not np.array_equal(groups > 0, grouped):
        return False
    pairs = np.unique(np.stack([groups[grouped], labels[grouped]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def arcs(rng, count, length, dim, step):
    """``count`` chains of ``length`` unit vectors, consecutive ones at angle ``step`` on a random great circle."""
    out = []
    for _ in range(count):
        u, v = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T
        angles = rng.uniform(0, 2 * np.pi) + step * np.arange(length)
        out.append(np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * v)
    return np.concatenate(out)


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_long_chains_in_shuffled_order_are_one_group_each(method, monkeypatch):
    # Neighbours on an arc at cosine 0.97 (> 0.95), next-but-one at 0.88: each 60-photo arc is one group
    # only through the chain, which the rows' shuffled order links in many small pieces.
    rng = np.random.default_rng(1)
    step = np.arccos(0.97)
    vectors = np.concatenate([arcs(rng, 20, 60, 24, step), unit(rng.normal(size=(800, 24)))])
    vectors = vectors[rng.permutation(len(vectors))].astype(np.float32)
    # The ivf method with every list probed compares every pair: exactly the exact groups. Tiny tiles and
    # passes make it cut lists and list ranges into pieces.
    monkeypatch.setattr(geoswc.tagging.duplicates, "_TILE", 13)
    monkeypatch.setattr(geoswc.tagging.duplicates, "_PROBES_PER_PASS", 200)
    groups = duplicate_groups(vectors, threshold=0.95, method=method, nlist=9, nprobe=9, block=100)
    grouped, labels = reference_groups(vectors, 0.95)
    assert same_partition(groups, grouped, labels)
    assert groups.max() == 20
    firsts = [np.flatnonzero(groups == g)[0] for g in range(1, groups.max() + 1)]
    assert firsts == sorted(firsts)


def planted_archive(rng, n, dim):
    """Random unit vectors with planted groups of 2-4: each copy is an earlier member plus noise (cosine
    0.97-0.995 to it), so groups include chains. Returns the float16 vectors and the planted groups' rows."""
    vectors = unit(rng.normal(size=(n, dim)))
    sizes = rng.integers(2, 5, size=n // 60)
    rows = rng.permutation(n)[: sizes.sum()]
    planted = np.split(rows, np.cumsum(sizes)[:-1])
    for members in planted:
        for k in range(1, len(members)):
            eps = rng.uniform(0.1, 0.25)  # cosine 1 / sqrt(1 + eps^2)
            source = vectors[members[rng.integers(0, k)]]
            copy = source + eps * rng.normal(size=dim) / np.sqrt(dim)
            vectors[members[k]] = copy / np.linalg.norm(copy)
    return vectors.astype(np.float16), planted


def test_ivf_finds_the_exact_groups_in_a_20000_photo_archive(tmp_path):
    rng = np.random.default_rng(2)
    vectors, planted = planted_archive(rng, 20000, 64)
    path = tmp_path / "embeddings.npy"
    np.save(path, vectors)
    archive = np.load(path, mmap_mode="r")  # as a tag run's embeddings are opened
    exact = duplicate_groups(archive, method="exact")
    ivf = duplicate_groups(archive, method="ivf", progress=True)

    # Independent truth: random 64-dimensional pairs lie below cosine 0.8, so the groups are the connected
    # components of the planted groups' pairs at or above the threshold.
    x = vectors.astype(np.float32)
    ii, jj = [], []
    for members in planted:
        a, b = np.nonzero(np.triu(x[members] @ x[members].T >= DUPLICATE_THRESHOLD, k=1))
        ii += members[a].tolist()
        jj += members[b].tolist()
    graph = coo_matrix((np.ones(len(ii)), (ii, jj)), shape=(len(x),) * 2)
    _, labels = connected_components(graph, directed=False)
    grouped = np.bincount(labels)[labels] >= 2
    assert grouped.sum() > 600
    assert same_partition(exact, grouped, labels)

    # Every ivf link is a compared pair at or above the threshold: its groups never join two exact groups.
    for g in range(1, ivf.max() + 1):
        assert len(np.unique(exact[ivf == g])) == 1 and exact[ivf == g][0] > 0
    # Recall of the pairs exact puts together (identical groups on this archive in practice).
    keys, counts = np.unique(np.stack([exact[grouped], ivf[grouped]]), axis=1, return_counts=True)
    linked = counts[keys[1] > 0]
    sizes = np.bincount(exact[grouped])
    assert (linked * (linked - 1) // 2).sum() >= 0.99 * (sizes * (sizes - 1) // 2).sum()
    firsts = [np.flatnonzero(ivf == g)[0] for g in range(1, ivf.max() + 1)]
    assert firsts == sorted(firsts)


def test_auto_compares_small_archives_exactly_and_large_ones_through_inverted_lists(monkeypatch, caplog):
    rng = np.random.default_rng(3)
    vectors, _ = planted_archive(rng, 600, 32)
    exact = duplicate_groups(vectors, method="exact")
    caplog.set_level(logging.INFO, logger="geoswc.tagging.duplicates")
    assert np.array_equal(duplicate_groups(vectors), exact)
    assert "inverted lists" not in caplog.text
    monkeypatch.setattr(geoswc.tagging.duplicates, "EXACT_DUPLICATES_MAX", 599)
    assert np.array_equal(duplicate_groups(vectors, nprobe=1000), exact)  # every list probed: every pair
    assert "near-duplicates of 600 photos over 98 inverted lists (nprobe 98)" in caplog.text


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
