"""Files written whole or not at all, under temporary names nobody can predict (`geoswc.data.files`)."""

import os
import stat

import numpy as np
import pytest

from geoswc.data.files import atomic_path, write_text_atomic
from geoswc.data.features import merge_image_parts, write_meta


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name != "out.json.tmp" and tmp.name.startswith(".out.json.")
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing moves before the block ends
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_temporary_names_differ_and_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a") as one, atomic_path(tmp_path / "b") as two:
            assert one.name != two.name
        write_text_atomic(tmp_path / "c", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o640


def test_a_link_planted_at_the_old_temporary_names_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "cache"
    parts = tmp_path / "parts"
    out.mkdir()
    parts.mkdir()
    for name in (
        "features.tmp.npy",
        "latlon.tmp.npy",
        "labels.tmp.npy",
        "ids.tmp.txt",
        "authors.tmp.txt",
        "meta.tmp.json",
    ):
        (out / name).symlink_to(victim)
    rng = np.random.default_rng(0)
    np.save(parts / "part_00000.npy", rng.standard_normal((3, 4)).astype(np.float16))
    merge_image_parts(
        parts,
        out,
        latlon=rng.uniform(-9, 9, (3, 2)),
        labels=np.zeros((3, 1), np.int64),
        ids=["a", "b", "c"],
        authors=["x", "y", "z"],
        part_size=3,
        dim=4,
    )
    write_meta(out, {"count": 3})
    assert victim.read_text() == "precious"
    assert np.load(out / "features.npy").shape == (3, 4) and (out / "ids.txt").read_text() == "a\nb\nc\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind
