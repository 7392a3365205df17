import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geoswc.classifiers import load_head
from geoswc.cli import main as geoswc_main
from geoswc.eval import accuracy_at

from conftest import two_rank_launch


def train_main(argv):
    return geoswc_main(["train", *argv])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic world (48 px photos) with cells built from its training photos."""
    from geoswc.data.synth import make_world
    from geoswc.geocells import S2Partitioner

    root = tmp_path_factory.mktemp("world")
    make_world(root, n_train=240, n_test=60, seed=1, image_size=48, progress=False)
    train = np.loadtxt(root / "train.csv", delimiter=",", skiprows=1, usecols=(2, 3))
    cells = S2Partitioner(min_images=5, max_images=(80, 40, 20)).fit(train[:, 0], train[:, 1]).geocells_
    cells.save(root / "cells")
    return root


COMMON = [
    "--preset",
    "tiny",
    "--cpu",
    "--set",
    "data.image_size=32",
    "--set",
    "backbone.weights=null",
    "--set",
    "backbone.pretrained=false",
    "--set",
    "train.seed=3",
]


@pytest.fixture(scope="module")
def cache(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    rc = train_main(
        [
            "features",
            "--cells",
            str(world / "cells"),
            "--csv",
            str(world / "train.csv"),
            "--images",
            str(world / "images"),
            "--out",
            str(out),
            "--part-size",
            "100",
            *COMMON,
        ]
    )
    assert rc == 0
    return out


def test_feature_cache_layout(world, cache):
    from geoswc.geocells import Geocells

    cells = Geocells.load(world / "cells")
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["fingerprint"] == cells.fingerprint and meta["dim"] == 1280 and meta["count"] == 240
    feats = np.load(cache / "features.npy", mmap_mode="r")
    assert feats.dtype == np.float16 and feats.shape == (240, 1280) and np.isfinite(feats).all()
    table = np.loadtxt(world / "train.csv", delimiter=",", skiprows=1, usecols=(2, 3))
    np.testing.assert_array_equal(np.load(cache / "latlon.npy"), table)
    np.testing.assert_array_equal(np.load(cache / "labels.npy"), cells.assign(table[:, 0], table[:, 1]))
    ids = (cache / "ids.txt").read_text().split()
    assert ids == [line.split(",")[0] for line in (world / "train.csv").read_text().splitlines()[1:]]
    assert not (cache / "parts").exists()


def _interrupted_features(args, monkeypatch):
    """Run ``args`` until the merge starts (every part written), as if the process were killed there."""
    load = np.load

    def load_until_second_part(path, *a, **kw):
        if Path(path).name == "part_00001.npy":
            raise Killed
        return load(path, *a, **kw)

    monkeypatch.setattr(np, "load", load_until_second_part)
    with pytest.raises(Killed):
        train_main(args)
    monkeypatch.undo()


def test_feature_extraction_resumes_by_part(world, cache, tmp_path, monkeypatch, caplog):
    args = [
        "features",
        "--cells",
        str(world / "cells"),
        "--csv",
        str(world / "train.csv"),
        "--images",
        str(world / "images"),
        "--out",
        str(tmp_path),
        "--part-size",
        "100",
        *COMMON,
    ]
    _interrupted_features(args, monkeypatch)
    # A part already on disk is kept, not recomputed: replace one and check it lands in the merged cache.
    planted = np.full((100, 1280), 7, np.float16)
    np.save(tmp_path / "parts" / "part_00001.npy", planted)
    assert train_main(args) == 0
    merged = np.load(tmp_path / "features.npy")
    np.testing.assert_array_equal(merged[100:200], planted)
    np.testing.assert_array_equal(merged[:100], np.load(cache / "features.npy")[:100])

    # Parts made with other settings (here another input size) are not merged into this cache.
    _interrupted_features(args, monkeypatch)
    np.save(tmp_path / "parts" / "part_00001.npy", planted)
    with caplog.at_level("WARNING", logger="geoswc.train"):
        assert train_main([*args, "--set", "data.image_size=48"]) == 0
    assert "other image_size: starting the features over" in caplog.text
    assert not (np.load(tmp_path / "features.npy")[100:200] == 7).all()


def test_parts_without_a_key_are_not_trusted(world, cache, tmp_path):
    # Parts from an unknown run (no key.json) are discarded: the cache equals a clean extraction.
    (tmp_path / "parts").mkdir()
    np.save(tmp_path / "parts" / "part_00001.npy", np.full((100, 1280), 7, np.float16))
    assert (
        train_main(
            [
                "features",
                "--cells",
                str(world / "cells"),
                "--csv",
                str(world / "train.csv"),
                "--images",
                str(world / "images"),
                "--out",
                str(tmp_path),
                "--part-size",
                "100",
                *COMMON,
            ]
        )
        == 0
    )
    assert (tmp_path / "features.npy").read_bytes() == (cache / "features.npy").read_bytes()


class Killed(Exception):
    """Stands for the process being killed."""


CACHE_FILES = ("features.npy", "latlon.npy", "labels.npy", "ids.txt", "authors.txt", "meta.json")


def test_feature_merge_killed_midway_is_completed_on_rerun(world, cache, tmp_path, monkeypatch):
    args = [
        "features",
        "--cells",
        str(world / "cells"),
        "--csv",
        str(world / "train.csv"),
        "--images",
        str(world / "images"),
        "--out",
        str(tmp_path),
        "--part-size",
        "100",
        *COMMON,
    ]
    (tmp_path / "meta.json").write_text((cache / "meta.json").read_text())  # an older cache in the folder
    _interrupted_features(args, monkeypatch)
    assert sorted(p.name for p in (tmp_path / "parts").glob("part_*")) == [
        f"part_0000{i}.npy" for i in range(3)
    ]
    # The merge cleaned up after itself: no half-written file, and no mark of a complete cache.
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "meta.json").exists()

    assert train_main(args) == 0
    for name in CACHE_FILES:
        assert (tmp_path / name).read_bytes() == (cache / name).read_bytes(), name
    assert not (tmp_path / "parts").exists() and not list(tmp_path.glob(".*.tmp"))


def test_heads_from_features(world, cache, tmp_path):
    from geoswc.geocells import Geocells

    rc = geoswc_main(
        [
            "train",
            "heads",
            "--cells",
            str(world / "cells"),
            "--features",
            str(cache),
            "--val-features",
            str(cache),
            "--out",
            str(tmp_path),
            "--log-with",
            "csv",
            *COMMON,
            "--set",
            "heads.epochs=2",
        ]
    )
    assert rc == 0
    cells = Geocells.load(world / "cells")
    heads = {
        k: load_head(tmp_path / "heads" / f"{k}.safetensors", geocells=cells) for k in ("ce", "hc", "mvmf")
    }
    assert heads["hc"].sizes == [len(p) for p in cells.partitions]
    summary = json.loads((tmp_path / "train_heads.json").read_text())
    assert summary["ranks_identical"] is True
    for kind in ("ce", "hc", "mvmf"):
        history = summary["heads"][kind]["history"]
        assert len(history) == 2 and {"acc_2500km", "loss", "images_per_s"} <= set(history[-1])
    assert (tmp_path / "logs" / "heads" / "metrics.csv").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_mvmf_mixture_starts_from_the_ce_layer(world, cache, tmp_path):
    # Zero epochs of MvMF training: its mixture layer must equal the CE layer trained before it.
    assert (
        train_main(
            [
                "heads",
                "--cells",
                str(world / "cells"),
                "--features",
                str(cache),
                "--out",
                str(tmp_path),
                "--kinds",
                "mvmf",
                "ce",
                *COMMON,
                "--set",
                "heads.epochs=1",
                "--max-steps",
                "1000",
            ]
        )
        == 0
    )
    ce = load_file(str(tmp_path / "heads" / "ce.safetensors"))
    out2 = tmp_path / "zero"
    assert (
        train_main(
            [
                "heads",
                "--cells",
                str(world / "cells"),
                "--features",
                str(cache),
                "--out",
                str(out2),
                "--kinds",
                "ce",
                "mvmf",
                "--model",
                str(tmp_path),
                *COMMON,
                "--set",
                "heads.epochs=0",
            ]
        )
        == 0
    )
    mvmf = load_file(str(out2 / "heads" / "mvmf.safetensors"))
    torch.testing.assert_close(mvmf["fc.weight"], ce["fc.weight"])
    torch.testing.assert_close(mvmf["fc.bias"], ce["fc.bias"])


def test_heads_resume_exactly(world, cache, tmp_path):
    args = [
        "heads",
        "--cells",
        str(world / "cells"),
        "--features",
        str(cache),
        "--kinds",
        "hc",
        *COMMON,
        "--set",
        "heads.epochs=2",
        "--set",
        "heads.batch_size=16",
    ]
    assert train_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert train_main([*args, "--out", str(tmp_path / "b"), "--max-steps", "20"]) == 0  # mid epoch 2
    assert not (tmp_path / "b" / "heads" / "hc.safetensors").exists()
    assert train_main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_file(str(tmp_path / "a" / "heads" / "hc.safetensors"))
    b = load_file(str(tmp_path / "b" / "heads" / "hc.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_heads_refuse_cache_of_other_cells(world, cache, tmp_path):
    from geoswc.geocells import S2Partitioner

    train = np.loadtxt(world / "train.csv", delimiter=",", skiprows=1, usecols=(2, 3))
    S2Partitioner(min_images=5, max_images=(60,)).fit(train[:, 0], train[:, 1]).geocells_.save(
        tmp_path / "c2"
    )
    rc = geoswc_main(
        [
            "train",
            "heads",
            "--cells",
            str(tmp_path / "c2"),
            "--features",
            str(cache),
            "--out",
            str(tmp_path / "o"),
            *COMMON,
        ]
    )
    assert rc == 2


@pytest.mark.slow
def test_backbone_stage_end_to_end(world, tmp_path):
    rc = geoswc_main(
        [
            "train",
            "backbone",
            "--cells",
            str(world / "cells"),
            "--train-csv",
            str(world / "train.csv"),
            "--images",
            str(world / "images"),
            "--val-csv",
            str(world / "test.csv"),
            "--out",
            str(tmp_path),
            *COMMON,
            "--set",
            "backbone.epochs=1",
            "--set",
            "backbone.batch_size=60",
        ]
    )
    assert rc == 0
    for name in (
        "backbone.safetensors",
        "backbone.json",
        "heads/ce.safetensors",
        "cells/geocells.json",
        "config.yaml",
        "train_backbone.json",
    ):
        assert (tmp_path / name).is_file(), name
    history = json.loads((tmp_path / "train_backbone.json").read_text())["history"]
    assert len(history) == 1 and 0 <= history[0]["acc_2500km"] <= 1


def test_accuracy_at_hand_computed():
    # 1 degree of latitude = 111.19 km on R = 6371 km.
    truth = np.array([[0.0, 0.0]] * 4)
    pred = np.array([[0.005, 0.0], [0.2, 0.0], [1.5, 0.0], [30.0, 0.0]])
    acc = accuracy_at(pred, truth)
    assert acc["acc_1km"] == 0.25 and acc["acc_25km"] == 0.5 and acc["acc_200km"] == 0.75
    assert acc["acc_2500km"] == 0.75 and acc["acc_750km"] == 0.75


@pytest.mark.slow
def test_two_cpu_ranks_train_identical_heads(world, cache, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        *two_rank_launch(),
        "-m",
        "geoswc.train",
        "heads",
        "--cells",
        str(world / "cells"),
        "--features",
        str(cache),
        "--val-features",
        str(cache),
        "--out",
        str(tmp_path),
        "--kinds",
        "hc",
        *COMMON,
        "--set",
        "heads.epochs=2",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "train_heads.json").read_text())["heads"]["hc"]
    assert summary["num_processes"] == 2 and summary["ranks_identical"] is True
    assert len(summary["history"]) == 2 and "acc_2500km" in summary["history"][0]
    # The cosine schedule spans both epochs on each rank: half the base rate after the first, ~0 after the last.
    from geoswc.config import Config

    base = Config.load(tmp_path / "config.yaml").heads.lr
    assert summary["history"][0]["lr"] == pytest.approx(base / 2, rel=0.15)
    assert summary["history"][1]["lr"] < base * 0.02
