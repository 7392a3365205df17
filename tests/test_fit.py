"""`geoswc fit`: stages in order, markers, skipping, invalidation on a changed setting, --stages, --exclude."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoswc.cli import main
from geoswc.data.synth import make_world
from geoswc.config import resolve_config
from geoswc.train.fit import STAGES, FitRun, read_marker, run_pipeline

TRAINING_STAGES = ["data", "cells", "backbone", "features", "heads"]
# A randomly initialised small timm model at 64 px: the test checks the plumbing, not accuracy.
FAST = [
    "cells.min_images=5",
    "cells.max_images=[200, 80, 30]",
    "data.image_size=64",
    "backbone.model=tf_efficientnet_lite0",
    "backbone.pretrained=false",
    "backbone.epochs=1",
    "backbone.batch_size=32",
    "heads.epochs=1",
    "heads.batch_size=64",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(out, n_train=240, n_test=30, seed=5, progress=False, workers=1)
    return out


def _run(world, model_dir, sets=(), stages=TRAINING_STAGES, exclude=()):
    cfg = resolve_config("tiny", None, list(FAST) + list(sets))
    run = FitRun(
        train_csv=world / "train.csv",
        images=world / "images",
        model_dir=model_dir,
        config=cfg,
        exclude=tuple(exclude),
        cpu=True,
    )
    return run, run_pipeline(run, stages)


@pytest.mark.slow
def test_stages_write_markers_then_skip_and_rerun_only_what_a_change_touches(world, tmp_path):
    model_dir = tmp_path / "model"
    run, markers = _run(world, model_dir)
    assert list(markers) == TRAINING_STAGES
    assert set(run.timings) == set(TRAINING_STAGES)
    work = model_dir / "work"
    assert (work / "config.yaml").is_file()
    assert (work / "cells" / "geocells.json").is_file()
    assert (work / "backbone" / "backbone.safetensors").is_file()
    assert (work / "features" / "features.npy").is_file()
    for kind in ("ce", "hc", "mvmf"):
        assert (work / "heads" / "heads" / f"{kind}.safetensors").is_file()
    assert markers["cells"]["config"] == json.loads(json.dumps({"cells": run.config.to_dict()["cells"]}))
    assert len(markers["cells"]["details"]["cells"]) == 3  # three granularities

    # Same configuration: nothing runs again.
    again, markers_again = _run(world, model_dir)
    assert again.timings == {}
    assert {s: m["key"] for s, m in markers_again.items()} == {s: m["key"] for s, m in markers.items()}

    # A heads setting changes only the heads stage.
    changed, markers_changed = _run(world, model_dir, sets=["heads.lr=0.002"])
    assert set(changed.timings) == {"heads"}
    assert markers_changed["heads"]["key"] != markers["heads"]["key"]
    assert markers_changed["backbone"]["finished"] == markers["backbone"]["finished"]

    # A cells setting reruns cells and everything after it.
    changed, _ = _run(world, model_dir, sets=["heads.lr=0.002", "cells.min_images=6"])
    assert set(changed.timings) == {"cells", "backbone", "features", "heads"}


def test_a_failed_stage_leaves_no_marker_and_resumes_with_the_same_key(world, tmp_path, monkeypatch):
    from geoswc import fit

    def broken(run, out, resume):
        (out / "partial.txt").write_text("half done")
        raise RuntimeError("killed")

    monkeypatch.setitem(fit.STAGE_FUNCTIONS, "cells", broken)
    with pytest.raises(RuntimeError, match="killed"):
        _run(world, tmp_path / "m", stages=["data", "cells"])
    cells = tmp_path / "m" / "work" / "cells"
    assert read_marker(tmp_path / "m" / "work" / "data") is not None
    assert read_marker(cells) is None and (cells / "partial.txt").is_file()

    seen = {}

    def resumed(run, out, resume):
        seen["resume"] = resume
        seen["kept"] = (out / "partial.txt").is_file()
        return {}

    monkeypatch.setitem(fit.STAGE_FUNCTIONS, "cells", resumed)
    run, _ = _run(world, tmp_path / "m", stages=["data", "cells"])
    assert seen == {"resume": True, "kept": True} and set(run.timings) == {"cells"}
    # With another configuration the unfinished attempt is thrown away instead.
    (cells / "stage.json").unlink()
    (cells / "attempt.json").write_text(json.dumps({"key": "other"}))
    _run(world, tmp_path / "m", stages=["cells"])
    assert seen == {"resume": False, "kept": False}


def test_exclude_drops_benchmark_authors_and_ids(world, tmp_path):
    train = pd.read_csv(world / "train.csv")
    bench = tmp_path / "bench.csv"
    # One benchmark photo by a training author, one that is a training photo under its bare file name.
    author = train["AUTHOR"].iloc[0]
    same_photo = train["IMG_ID"].iloc[-1].rsplit("/", 1)[-1]
    pd.DataFrame(
        {
            "IMG_ID": ["x.jpg", same_photo],
            "AUTHOR": [author, "nobody@N00"],
            "LAT": [0.0, 1.0],
            "LON": [0.0, 1.0],
        }
    ).to_csv(bench, index=False)
    _, markers = _run(world, tmp_path / "m", stages=["data"], exclude=[bench])
    kept = pd.read_csv(tmp_path / "m" / "work" / "data" / "train.csv")
    by_author = int((train["AUTHOR"] == author).sum())
    assert markers["data"]["details"] == {
        "photos": len(train) - by_author - 1,
        "excluded_by_author": by_author,
        "excluded_by_id": 1,
    }
    assert author not in set(kept["AUTHOR"]) and train["IMG_ID"].iloc[-1] not in set(kept["IMG_ID"])


def test_stages_need_the_earlier_ones_and_bad_input_names_the_value(world, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs stage 'data'"):
        _run(world, tmp_path / "m", stages=["cells"])
    with pytest.raises(ValueError, match="unknown stage 'cell'; choose one of: " + ", ".join(STAGES)):
        _run(world, tmp_path / "m", stages=["cell"])
    code = main(
        ["fit", str(world / "nope.csv"), "--images", str(world / "images"), "-o", str(tmp_path / "x")]
    )
    assert code == 2 and "nope.csv" in capsys.readouterr().err
    code = main(
        [
            "fit",
            str(world / "train.csv"),
            "--images",
            str(world / "images"),
            "-o",
            str(tmp_path / "x"),
            "--preset",
            "huge",
        ]
    )
    assert code == 2 and "unknown preset 'huge'" in capsys.readouterr().err


def test_missing_images_are_reported_with_an_example(world, tmp_path):
    frame = pd.read_csv(world / "train.csv")
    frame.loc[3, "IMG_ID"] = "zz/zz/missing.jpg"
    csv = tmp_path / "train.csv"
    frame.to_csv(csv, index=False)
    cfg = resolve_config("tiny", None, FAST)
    run = FitRun(train_csv=csv, images=world / "images", model_dir=tmp_path / "m", config=cfg, cpu=True)
    with pytest.raises(FileNotFoundError, match="1 of 240 photos .* e.g. .*zz/zz/missing.jpg"):
        run_pipeline(run, ["data"])


# ------------------------------------------------------------------------------------------- from shards
# Small settings for the stages after the heads, so the whole pipeline runs in the test's time.
FAST_ALL = FAST + ["retrieval.epochs=2", "retrieval.hidden_dim=64", "retrieval.memory_size=128"]


@pytest.fixture(scope="module")
def shards(world, tmp_path_factory):
    """The world's training photos as `geoswc data shards` writes them, labelled with cells of its own: fit
    must not trust those labels (its own cells differ)."""
    root = tmp_path_factory.mktemp("shards")
    assert (
        main(
            [
                "cells",
                "build",
                str(world / "train.csv"),
                "-o",
                str(root / "other_cells"),
                "--min-images",
                "8",
                "--max-images",
                "120",
                "40",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "shards",
                str(world / "train.csv"),
                "--images",
                str(world / "images"),
                "-o",
                str(root / "shards"),
                "--cells",
                str(root / "other_cells"),
                "--samples-per-shard",
                "100",
            ]
        )
        == 0
    )
    return root / "shards"


@pytest.mark.slow
def test_fit_from_shards_trains_every_stage_into_a_model_that_predicts(world, shards, tmp_path, capsys):
    from geoswc.data.metadata import read_metadata
    from geoswc.geocells import Geocells
    from geoswc.geolocator import Geolocator

    model_dir = tmp_path / "model"
    argv = [
        "fit",
        "--shards",
        str(shards / "*.tar"),
        "-o",
        str(model_dir),
        "--preset",
        "tiny",
        "--cpu",
        *[arg for s in FAST_ALL for arg in ("--set", s)],
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "240 photos in 3 shards" in printed and "fit finished" in printed
    work = model_dir / "work"
    markers = {stage: read_marker(work / stage) for stage in STAGES}
    assert all(markers.values())
    # The data stage read every sample's coordinates from the shards.
    truth = read_metadata(world / "train.csv").set_index("IMG_ID")
    seen = pd.read_csv(work / "data" / "train.csv").set_index("IMG_ID")
    assert sorted(seen.index) == sorted(truth.index)
    assert (seen.loc[truth.index, ["LAT", "LON"]].to_numpy() == truth[["LAT", "LON"]].to_numpy()).all()
    # The training stages labelled the photos with fit's cells, not with the cells stored in the shards.
    cells = Geocells.load(work / "cells")
    assert str(cells.fingerprint) != str(Geocells.load(shards.parent / "other_cells").fingerprint)
    ids = (work / "features" / "ids.txt").read_text().split()
    labels = np.load(work / "features" / "labels.npy")
    expected = cells.assign(truth.loc[ids, "LAT"].to_numpy(), truth.loc[ids, "LON"].to_numpy())
    np.testing.assert_array_equal(labels, expected)
    assert [Path(f).name for f, _ in markers["data"]["inputs"]["shards"]["files"]] == [
        "000000-000.tar",
        "000001-000.tar",
        "000002-000.tar",
    ]

    model = Geolocator.from_pretrained(model_dir, device="cpu")
    test_ids = pd.read_csv(world / "test.csv")["IMG_ID"].tolist()[:4]
    predictions = model.predict([world / "images" / i for i in test_ids])
    assert len(predictions) == 4
    assert all(-90 <= p["lat"] <= 90 and -180 <= p["lon"] <= 180 for p in predictions)

    # The same shards, named by their folder this time: every stage is skipped. A changed shard set reruns
    # from the data stage on.
    assert main([a if a != str(shards / "*.tar") else str(shards) for a in argv]) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == len(STAGES)
    first = min(shards.glob("*.tar"))
    argv_fewer = [a if a != str(shards / "*.tar") else str(first) for a in argv]
    assert main(argv_fewer + ["--stages", "data"]) == 0
    assert "100 photos in 1 shards" in capsys.readouterr().out
    assert read_marker(work / "data")["key"] != markers["data"]["key"]


def test_fit_takes_either_a_csv_with_images_or_shards(world, shards, tmp_path, capsys):
    out = ["-o", str(tmp_path / "m")]
    cases = [
        ([*out], r"either as TRAIN.csv with --images or as --shards DIR_OR_PATTERN \(neither given\)"),
        (
            [str(world / "train.csv"), "--images", str(world / "images"), "--shards", str(shards), *out],
            r"\(both given\)",
        ),
        ([str(world / "train.csv"), *out], "needs --images"),
        (["--shards", str(shards), "--images", str(world / "images"), *out], "--images goes with TRAIN.csv"),
        (["--shards", str(tmp_path / "none" / "*.tar"), *out], "no shards"),
        (["--shards", str(shards / "000000-00{0,7}.tar"), *out], "shard not found: .*000000-007.tar"),
        (
            ["--shards", str(shards), "--val-csv", str(world / "test.csv"), *out],
            "--val-csv needs --val-images",
        ),
        (
            [
                "--shards",
                str(shards),
                "--val-csv",
                str(world / "test.csv"),
                "--val-shards",
                str(shards),
                *out,
            ],
            "either as --val-csv or as --val-shards",
        ),
    ]
    for argv, message in cases:
        assert main(["fit", *argv]) == 2, argv
        assert re.search(message, capsys.readouterr().err), (argv, message)
    assert not (tmp_path / "m").exists()


def test_fit_refuses_shards_that_hold_benchmark_photos(world, shards, tmp_path):
    bench = tmp_path / "bench.csv"
    author = pd.read_csv(world / "train.csv")["AUTHOR"].iloc[5]
    pd.DataFrame({"IMG_ID": ["x.jpg"], "AUTHOR": [author], "LAT": [0.0], "LON": [0.0]}).to_csv(
        bench, index=False
    )
    cfg = resolve_config("tiny", None, FAST)
    run = FitRun(shards=str(shards), model_dir=tmp_path / "m", config=cfg, exclude=(bench,), cpu=True)
    with pytest.raises(ValueError, match=r"photos by authors .* geoswc data shards \.\.\. --exclude"):
        run_pipeline(run, ["data"])
    assert read_marker(tmp_path / "m" / "work" / "data") is None
