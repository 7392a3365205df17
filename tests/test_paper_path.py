"""The paper's path end to end: `fit --preset paper` (EfficientNet-B4 at 300 px, the paper's partitions, heads
on augmented images) on a small synthetic world, then `evaluate` and `tag`; and the same command without
network fails in seconds, naming the weights it wanted."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import timm
from photo_fixtures import make_mixed_photos
from safetensors.torch import save_file

from geoswc.classifiers.backbone import PretrainedWeightsUnavailable, check_pretrained_available
from geoswc.cli import main
from geoswc.config import load_preset
from geoswc.train.fit import STAGES, read_marker
from geoswc.geolocator import Geolocator

HUB_ID = "timm/efficientnet_b4.ra2_in1k"
# Overrides for sizes, epochs and cell thresholds only; everything else is the paper preset.
SMALL = [
    "cells.min_images=2",
    "cells.max_images=[24, 12, 6]",
    "cells.target_cells=10",
    "data.num_workers=0",
    "backbone.epochs=1",
    "backbone.batch_size=16",
    "heads.epochs=1",
    "heads.batch_size=16",
    "retrieval.epochs=1",
    "retrieval.batch_size=16",
    "retrieval.hidden_dim=64",
    "retrieval.memory_size=32",
]


def _fill_hub_cache(cache, monkeypatch):
    """Random-weight B4 in the Hugging Face cache where timm's pretrained weights would be: the paper
    preset's ImageNet start, offline (the setup the offline message describes)."""
    import huggingface_hub.constants

    commit = "0" * 40
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    model = timm.create_model("efficientnet_b4", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_the_paper_preset_holds_the_papers_partitions_and_head_training():
    cfg = load_preset("paper")
    assert cfg.cells.target_cells == 32000 and tuple(cfg.cells.max_images) == (5000, 2000, 1000)
    assert cfg.backbone.model == "efficientnet_b4" and cfg.data.image_size == 300
    assert cfg.data.eval_resize == "longest" and cfg.heads.from_features is False
    assert cfg.backbone.batch_size == cfg.heads.batch_size == 64


@pytest.mark.slow
def test_fit_evaluate_and_tag_the_paper_path_on_a_small_world(tmp_path, monkeypatch):
    _fill_hub_cache(tmp_path / "hub", monkeypatch)
    world = tmp_path / "world"
    assert (
        main(["data", "synth", str(world), "--train", "40", "--test", "6", "--seed", "3", "--workers", "1"])
        == 0
    )
    model_dir = tmp_path / "model"
    sets = [arg for s in SMALL for arg in ("--set", s)]
    fit = ["fit", str(world / "train.csv"), "--images", str(world / "images"), "-o", str(model_dir)]
    assert main([*fit, "--preset", "paper", "--cpu", *sets]) == 0

    for stage in STAGES:
        assert read_marker(model_dir / "work" / stage) is not None, stage
    heads_summary = json.loads((model_dir / "work" / "heads" / "train_heads.json").read_text())
    # The heads trained on augmented images through the backbone, which stayed frozen.
    assert heads_summary["on_images"] is True and heads_summary["backbone_unchanged"] is True

    model = Geolocator.from_pretrained(model_dir, device="cpu")
    assert model.backbone_name == "efficientnet_b4" and model.config.data.image_size == 300
    names = model.geocells.names
    assert set(names) == {"cells_2_24", "cells_2_12", "cells_2_6", "cells_2_n10"}
    assert model.heads["ce"].partitions == model.heads["mvmf"].partitions == ["cells_2_n10"]
    assert model.heads["hc"].partitions == ["cells_2_24", "cells_2_12", "cells_2_6"]
    # The background rows per cell of every partition, against each partition's own assignment.
    index = model.index
    assert index.partition == "cells_2_n10"
    queries = np.asarray(index.embeddings, dtype=np.float32)
    for name in names:
        part = model.geocells.partition(name)
        truth = part.assign(*np.asarray(index.latlon).T)
        assert np.array_equal(index.cell_sizes(name), np.bincount(truth[truth >= 0], minlength=len(part)))
        # Searching a cell with every row's own embedding finds only rows of that cell.
        _, rows = index.search_cells(queries, np.maximum(truth, 0), len(index), partition=name)
        for r in np.flatnonzero(truth >= 0):
            hits = rows[r][rows[r] >= 0]
            assert sorted(hits.tolist()) == np.flatnonzero(truth == truth[r]).tolist(), (name, r)

    out = tmp_path / "eval"
    meta = world / "test.csv"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model_dir),
                "--meta",
                str(meta),
                "--images",
                str(world / "images"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    n_test = len(pd.read_csv(meta))
    for mode in ("ce", "hc", "mvmf", "rrm", "ce+rrm", "hc+rrm", "mvmf+rrm"):
        assert (out / f"predictions_{mode}.csv").is_file(), mode
        assert len(pd.read_csv(out / f"predictions_{mode}.csv")) == n_test, mode
    assert results

    photos = make_mixed_photos(tmp_path / "photos")
    tags = tmp_path / "tags.csv"
    assert (
        main(["tag", str(tmp_path / "photos"), "--model", str(model_dir), "-o", str(tags), "--no-progress"])
        == 0
    )
    table = pd.read_csv(tags)
    assert len(table) == len(photos)
    assert table[["lat", "lon"]].notna().all().all()


def test_a_missing_network_fails_fast_naming_the_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"hf-hub:timm/efficientnet_b4\.ra2_in1k") as err:
        check_pretrained_available("efficientnet_b4")
    assert time.perf_counter() - started < 10
    assert "backbone.weights=" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    # Offline by setting: no request at all.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="HF_HUB_OFFLINE is set"):
        check_pretrained_available("efficientnet_b4")


@pytest.mark.slow
def test_fit_with_the_paper_preset_and_no_network_stops_in_seconds(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "train.csv").write_text("IMG_ID,AUTHOR,LAT,LON\na.jpg,u,1.0,2.0\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    # Nothing answers on port 9 of this machine: the hub is unreachable; an empty cache holds no weights.
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "geoswc", "fit", "train.csv", "--images", "images", "-o", "model", "--cpu"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert "hf-hub:timm/efficientnet_b4.ra2_in1k" in result.stderr
    assert "--set backbone.weights=" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    # The hub client's retries (about 50 s) never started.
    assert "Retry" not in result.stderr and elapsed < 45, (elapsed, result.stderr[-1000:])
    assert not (tmp_path / "model" / "work" / "backbone").exists()
