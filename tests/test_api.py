"""The Python API mirrors the command line: train, evaluate and tag from a notebook, with no argparse involved."""

import argparse
import json

import pandas as pd
import pytest

import geoswc
from geoswc.data.synth import make_world
from geoswc.tagging.output import read_rows

# A randomly initialised small timm model at 64 px and few epochs: the test checks the plumbing, not accuracy.
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
    "retrieval.epochs=2",
    "retrieval.hidden_dim=64",
]


def test_api_names_are_the_library_functions():
    from geoswc.evaluation.run import evaluate_model
    from geoswc.train.fit import fit_model
    from geoswc.geolocator import Geolocator
    from geoswc.tagging.run import tag_photos

    assert (geoswc.fit_model, geoswc.evaluate_model, geoswc.tag_photos, geoswc.Geolocator) == (
        fit_model,
        evaluate_model,
        tag_photos,
        Geolocator,
    )
    with pytest.raises(AttributeError, match="no attribute 'fit_modle'"):
        geoswc.fit_modle  # noqa: B018


@pytest.mark.slow
def test_fit_evaluate_and_tag_from_python(tmp_path, monkeypatch):
    def no_argparse(*args, **kwargs):
        raise AssertionError("the Python API parsed command-line arguments")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", no_argparse)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", no_argparse)
    world = tmp_path / "world"
    make_world(world, n_train=240, n_test=20, seed=3, progress=False, workers=1)

    model_dir = geoswc.fit_model(
        world / "train.csv",
        images=world / "images",
        out=tmp_path / "model",
        preset="tiny",
        overrides=FAST,
        cpu=True,
    )
    assert model_dir == tmp_path / "model" and (model_dir / "geolocator.json").is_file()
    markers = {p.parent.name for p in (model_dir / "work").glob("*/stage.json")}
    assert markers == {"data", "cells", "backbone", "features", "heads", "retrieval", "index", "model"}

    results = geoswc.evaluate_model(
        model_dir,
        world / "test.csv",
        images=world / "images",
        out=tmp_path / "eval",
        modes=["hc", "hc+rrm"],
        workers=0,
    )
    assert set(results) == {"hc", "hc+rrm"}
    assert results == json.loads((tmp_path / "eval" / "results.json").read_text())
    assert all(r["n_scored"] == r["n_truth"] == 20 and r["n_missing"] == 0 for r in results.values())

    photos = [world / "images" / i for i in pd.read_csv(world / "test.csv")["IMG_ID"][:6]]
    summary = geoswc.tag_photos(
        [str(p) for p in photos], model=model_dir, out=tmp_path / "tags.csv", workers=0
    )
    assert (summary["ok"], summary["error"], summary["tagged"]) == (6, 0, 6)
    rows = read_rows(str(tmp_path / "tags.csv"), "csv")
    assert [r["path"] for r in rows] == [str(p) for p in photos] and {r["status"] for r in rows} == {"ok"}
