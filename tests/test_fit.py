"""`geoswc fit`: stages in order, markers, skipping, invalidation on a changed setting, --stages, --exclude."""

import json

import pandas as pd
import pytest

from geoswc.cli import main
from geoswc.data.synth import make_world
from geoswc.fit import STAGES, FitRun, read_marker, resolve_fit_config, run_pipeline

TRAINING_STAGES = ["data", "cells", "backbone", "features", "heads"]
# A randomly initialised small timm model at 64 px: the test checks the plumbing, not accuracy.
FAST = [
    "cells.min_images=5", "cells.max_images=[200, 80, 30]", "data.image_size=64",
    "backbone.model=tf_efficientnet_lite0", "backbone.pretrained=false", "backbone.epochs=1",
    "backbone.batch_size=32", "heads.epochs=1", "heads.batch_size=64",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(out, n_train=240, n_test=30, seed=5, progress=False, workers=1)
    return out


def _run(world, model_dir, sets=(), stages=TRAINING_STAGES, exclude=()):
    cfg = resolve_fit_config("tiny", None, list(FAST) + list(sets))
    run = FitRun(train_csv=world / "train.csv", images=world / "images", model_dir=model_dir, config=cfg,
                 exclude=tuple(exclude), cpu=True)
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
    pd.DataFrame({"IMG_ID": ["x.jpg", same_photo], "AUTHOR": [author, "nobody@N00"], "LAT": [0.0, 1.0],
                  "LON": [0.0, 1.0]}).to_csv(bench, index=False)
    _, markers = _run(world, tmp_path / "m", stages=["data"], exclude=[bench])
    kept = pd.read_csv(tmp_path / "m" / "work" / "data" / "train.csv")
    by_author = int((train["AUTHOR"] == author).sum())
    assert markers["data"]["details"] == {"photos": len(train) - by_author - 1,
                                          "excluded_by_author": by_author, "excluded_by_id": 1}
    assert author not in set(kept["AUTHOR"]) and train["IMG_ID"].iloc[-1] not in set(kept["IMG_ID"])


def test_stages_need_the_earlier_ones_and_bad_input_names_the_value(world, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs stage 'data'"):
        _run(world, tmp_path / "m", stages=["cells"])
    with pytest.raises(ValueError, match="unknown stage 'cell'; choose from: " + ", ".join(STAGES)):
        _run(world, tmp_path / "m", stages=["cell"])
    code = main(["fit", str(world / "nope.csv"), "--images", str(world / "images"), "-o", str(tmp_path / "x")])
    assert code == 2 and "nope.csv" in capsys.readouterr().err
    code = main(["fit", str(world / "train.csv"), "--images", str(world / "images"), "-o", str(tmp_path / "x"),
                 "--preset", "huge"])
    assert code == 2 and "unknown preset 'huge'" in capsys.readouterr().err


def test_missing_images_are_reported_with_an_example(world, tmp_path):
    frame = pd.read_csv(world / "train.csv")
    frame.loc[3, "IMG_ID"] = "zz/zz/missing.jpg"
    csv = tmp_path / "train.csv"
    frame.to_csv(csv, index=False)
    cfg = resolve_fit_config("tiny", None, FAST)
    run = FitRun(train_csv=csv, images=world / "images", model_dir=tmp_path / "m", config=cfg, cpu=True)
    with pytest.raises(FileNotFoundError, match="1 of 240 photos .* e.g. .*zz/zz/missing.jpg"):
        run_pipeline(run, ["data"])
