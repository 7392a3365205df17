"""`geoswc assemble --from RUN` keeps the run's background index: the index stage writes ``index.json``, and a
run whose index was dropped would silently give a classification-only model."""

from __future__ import annotations

import shutil

import pytest

from geoswc.cli import main
from geoswc.geolocator import Geolocator


def _run_layout(model_dir, run):
    """The ``work/`` folder of a ``geoswc fit`` run, laid out as its stages write it, from a model folder's
    parts (the index stage writes `BackgroundIndex.save`'s files, as the model folder's ``index/`` holds)."""
    work = run / "work"
    shutil.copytree(model_dir / "cells", work / "cells")
    (work / "backbone").mkdir(parents=True)
    for name in ("backbone.safetensors", "backbone.json"):
        shutil.copy(model_dir / name, work / "backbone" / name)
    shutil.copytree(model_dir / "heads", work / "heads" / "heads")
    (work / "retrieval").mkdir()
    shutil.copy(model_dir / "retrieval.safetensors", work / "retrieval" / "retrieval.safetensors")
    shutil.copytree(model_dir / "index", work / "index")
    shutil.copy(model_dir / "config.yaml", work / "config.yaml")
    return work


def test_assemble_from_a_run_keeps_its_background_index(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    work = _run_layout(tiny_model_dir, run)
    assert (work / "index" / "index.json").is_file() and not (work / "index" / "meta.json").exists()
    out = tmp_path / "assembled"
    assert main(["assemble", "--from", str(run), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    original = Geolocator.from_pretrained(tiny_model_dir, device="cpu")
    assert f"background index of {len(original.index)} photos" in printed, printed
    model = Geolocator.from_pretrained(out, device="cpu")
    assert model.index is not None and len(model.index) == len(original.index)
    assert (out / "index" / "embeddings.npy").read_bytes() == (
        tiny_model_dir / "index" / "embeddings.npy"
    ).read_bytes()


@pytest.mark.slow
def test_a_fit_run_assembled_again_has_the_same_index_as_its_model(tmp_path, capsys):
    from geoswc.data.synth import make_world

    world = tmp_path / "world"
    make_world(world, n_train=160, n_test=16, seed=3, progress=False, workers=1)
    sets = [
        "cells.min_images=5",
        "cells.max_images=[200, 80, 30]",
        "data.image_size=64",
        "backbone.model=test_efficientnet",
        "backbone.pretrained=false",
        "backbone.weights=null",
        "backbone.epochs=1",
        "heads.epochs=1",
        "retrieval.epochs=2",
        "retrieval.hidden_dim=32",
        "retrieval.memory_size=64",
    ]
    run = tmp_path / "run"
    argv = [
        "fit",
        str(world / "train.csv"),
        "--images",
        str(world / "images"),
        "-o",
        str(run),
        "--preset",
        "tiny",
    ]
    assert main([*argv, "--cpu", *[a for s in sets for a in ("--set", s)]]) == 0
    capsys.readouterr()
    out = tmp_path / "again"
    assert main(["assemble", "--from", str(run), "-o", str(out)]) == 0
    assert "no index" not in capsys.readouterr().out
    fitted, again = (Geolocator.from_pretrained(p, device="cpu") for p in (run, out))
    assert again.index is not None and list(again.index.ids) == list(fitted.index.ids)
    photos = sorted((world / "images").rglob("*.jpg"))[:4]
    ours = again.predict([str(p) for p in photos], head="mvmf", mode="swc")
    theirs = fitted.predict([str(p) for p in photos], head="mvmf", mode="swc")
    assert [r["lat"] for r in ours] == [r["lat"] for r in theirs]
