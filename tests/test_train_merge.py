"""The streaming merge of feature-extraction parts against an in-memory concatenation of the same parts."""

import json

import numpy as np
import pytest

from geoswc.data.features import FeatureCache, merge_image_parts, merge_shard_parts

FILES = ("features.npy", "latlon.npy", "labels.npy", "ids.txt", "authors.txt")
DIM = 6


def _rows(rng, n, offset=0):
    return {
        "features": rng.standard_normal((n, DIM)).astype(np.float16),
        "latlon": rng.uniform(-80, 80, (n, 2)),
        "labels": rng.integers(-1, 50, (n, 3)),
        "ids": [f"{offset + i:03d}/photo é{offset + i}.jpg" for i in range(n)],
        "authors": [f"{(offset + i) % 4}@N0{i % 3}" for i in range(n)],
    }


def _write_concatenation(out, features, latlon, labels, ids, authors):
    """The cache files as a plain concatenation in memory writes them."""
    out.mkdir()
    np.save(out / "features.npy", np.asarray(features, np.float16))
    np.save(out / "latlon.npy", latlon)
    np.save(out / "labels.npy", labels)
    (out / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "authors.txt").write_text("".join(f"{a}\n" for a in authors))


def _assert_same_files(out, reference):
    for name in FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.glob("*.tmp.*")) and not list(out.glob(".*.tmp"))


def _image_parts(tmp_path, n=23, part_size=5):
    table = _rows(np.random.default_rng(0), n)
    table["latlon"] = np.asfortranarray(table["latlon"])  # as PhotoTable's, from pandas
    parts = tmp_path / "parts"
    parts.mkdir()
    for part, start in enumerate(range(0, n, part_size)):
        np.save(parts / f"part_{part:05d}.npy", table["features"][start : start + part_size])
    return table, parts


def _shard_parts(tmp_path, sizes=(7, 0, 9, 1, 5)):
    """One ``.npz`` per shard as `extract_shard_features` writes them, an empty shard among them."""
    rng = np.random.default_rng(1)
    parts = tmp_path / "parts"
    parts.mkdir()
    shards, offset = [], 0
    for part, k in enumerate(sizes):
        rows = _rows(rng, k, offset)
        if not k:  # an empty shard: no batches, so no label columns either
            rows["labels"] = np.zeros((0, 0), np.int64)
        with open(parts / f"part_{part:05d}.npz", "wb") as f:
            np.savez(
                f,
                features=rows["features"],
                ids=np.asarray(rows["ids"], dtype=str),
                authors=np.asarray(rows["authors"], dtype=str),
                latlon=rows["latlon"],
                labels=rows["labels"],
            )
        shards.append(rows)
        offset += k
    return shards, parts


def test_image_parts_merge_to_the_concatenation(tmp_path):
    table, parts = _image_parts(tmp_path)
    assert len(list(parts.iterdir())) == 5
    (tmp_path / "out").mkdir()
    merge_image_parts(
        parts,
        tmp_path / "out",
        latlon=table["latlon"],
        labels=table["labels"],
        ids=table["ids"],
        authors=table["authors"],
        part_size=5,
        dim=DIM,
    )
    _write_concatenation(tmp_path / "ref", **table)
    _assert_same_files(tmp_path / "out", tmp_path / "ref")


def test_shard_parts_merge_to_the_concatenation(tmp_path):
    shards, parts = _shard_parts(tmp_path)
    (tmp_path / "out").mkdir()
    assert merge_shard_parts(parts, tmp_path / "out", n_parts=len(shards), dim=DIM) == 22
    full = [s for s in shards if len(s["latlon"])]
    _write_concatenation(
        tmp_path / "ref",
        **{
            key: np.concatenate([s[key] for s in full])
            for key in ("features", "latlon", "labels", "ids", "authors")
        },
    )
    _assert_same_files(tmp_path / "out", tmp_path / "ref")


def test_image_part_of_other_settings_is_refused(tmp_path):
    table, parts = _image_parts(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="remove .*parts"):
        merge_image_parts(
            parts,
            tmp_path / "out",
            latlon=table["latlon"],
            labels=table["labels"],
            ids=table["ids"],
            authors=table["authors"],
            part_size=6,
            dim=DIM,
        )


def test_merge_over_a_killed_one_gives_the_same_files(tmp_path):
    """What a merge killed midway leaves: parts, half-written temporary files, files of an older cache and no
    meta.json. Merging again overwrites all of it."""
    shards, parts = _shard_parts(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    merge_shard_parts(parts, out, n_parts=len(shards), dim=DIM)
    reference = tmp_path / "ref"
    out.rename(reference)

    out.mkdir()
    (out / "features.tmp.npy").write_bytes(b"\x93NUMPY" + b"\0" * 5000)  # longer than the real file
    (out / "ids.tmp.txt").write_text("half\nwrit")  # the fixed temporary names of older versions
    (out / ".features.npy.k1ll3d.tmp").write_bytes(b"\x93NUMPY")  # left by a SIGKILL
    (out / ".ids.txt.k1ll3d.tmp").write_text("half\nwrit")
    np.save(out / "labels.npy", np.zeros((3, 1), np.int64))
    (out / "authors.txt").write_text("stale\n")
    merge_shard_parts(parts, out, n_parts=len(shards), dim=DIM)
    _assert_same_files(out, reference)


def test_merge_removes_the_mark_of_a_complete_cache_first(tmp_path):
    """Until the caller writes meta.json again, the folder is not a cache: readers refuse it rather than mix
    files of two runs."""
    table, parts = _image_parts(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"fingerprint": "old", "count": 3}))

    with pytest.raises(ValueError):  # a part of other settings stops the merge after meta.json went
        merge_image_parts(
            parts,
            out,
            latlon=table["latlon"],
            labels=table["labels"],
            ids=table["ids"],
            authors=table["authors"],
            part_size=6,
            dim=DIM,
        )
    assert not (out / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        FeatureCache(str(out))
