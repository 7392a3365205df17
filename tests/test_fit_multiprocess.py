"""`geoswc fit` on two real CPU ranks under `accelerate launch`: one process group for every stage, a model
folder that works, and progress bars from the main process only."""

import json
import os
import re
import subprocess
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from test_fit import FAST

from geoswc.cli import main
from geoswc.train.fit import STAGES, read_marker
from geoswc.geolocator import Geolocator
from conftest import two_rank_launch

# Every stage, retrieval included, with the small settings of test_fit.py.
SETTINGS = [*FAST, "retrieval.epochs=1"]
# Bars the training stages draw, by description; each starts at 0% once per process that draws it.
BARS = ["backbone 1/1", "features", "ce 1/1", "hc 1/1", "mvmf 1/1", "retrieval 1/1"]


@pytest.mark.slow
def test_two_cpu_ranks_fit_one_model_and_only_the_main_process_draws_bars(tmp_path):
    world = tmp_path / "world"
    synth = ["data", "synth", str(world), "--train", "240", "--test", "30", "--seed", "5", "--workers", "1"]
    assert main(synth) == 0
    model_dir = tmp_path / "model"
    # No --cpu: ACCELERATE_USE_CPU (what `use_cpu: true` in an accelerate config sets) must be enough to put
    # both ranks into one gloo group instead of two single-process worlds.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        *two_rank_launch(),
        "-m",
        "geoswc",
        "fit",
        str(world / "train.csv"),
        "--images",
        str(world / "images"),
        "-o",
        str(model_dir),
        "--preset",
        "tiny",
        *[arg for s in SETTINGS for arg in ("--set", s)],
    ]
    result = subprocess.run(
        cmd, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]

    for stage in STAGES:
        marker = read_marker(model_dir / "work" / stage)
        assert marker is not None and marker["num_processes"] == 2, (stage, marker)
    # BatchNorm running statistics are synced from rank 0 each epoch: both ranks end with the same backbone.
    backbone = json.loads((model_dir / "work" / "backbone" / "train_backbone.json").read_text())
    assert backbone["ranks_identical"] is True and "different weights" not in result.stderr

    model = Geolocator.from_pretrained(model_dir, device="cpu")
    photos = [str(world / "images" / i) for i in pd.read_csv(world / "test.csv")["IMG_ID"][:4]]
    latlon = np.array([[r["lat"], r["lon"]] for r in model.predict(photos, mode="swc")])
    assert latlon.shape == (4, 2) and np.isfinite(latlon).all()
    assert (np.abs(latlon[:, 0]) <= 90).all() and (np.abs(latlon[:, 1]) <= 180).all()

    # tqdm writes each refresh after a carriage return; a bar drawn by both ranks would start twice.
    starts = Counter(re.findall(r"(?:^|[\r\n])([^\r\n:]+): +0%\|", result.stderr))
    assert set(BARS) <= set(starts) and all(n == 1 for n in starts.values()), starts
    # The epoch summaries come from the main process too, once each.
    for name in ("backbone", "ce", "hc", "mvmf", "retrieval"):
        assert result.stdout.count(f"{name} epoch 1/1:") == 1, result.stdout
