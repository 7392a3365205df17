import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from geoswc.config import RetrievalConfig, TrainConfig
from geoswc.retrieval import ResidualRetrievalModule
from geoswc.train.retrieval import fit_retrieval_module, same_cell_precision
from retrieval_fixture import cell_features
from conftest import two_rank_launch

FAST = RetrievalConfig(hidden_dim=64, memory_size=128, epochs=60, batch_size=10, lr=3e-3)


def _accelerator(tmp_path):
    from geoswc.train.engine import build_accelerator

    return build_accelerator(TrainConfig(), cpu=True, out_dir=tmp_path)


def test_same_cell_precision_brute_force():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.95, 0.05]], np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    # largest inner product with another row: 0 -> 4 (0.95, miss), 1 -> 0 (0.90, hit), 2 -> 3 (0.90, hit),
    # 3 -> 2 (0.90, hit), 4 -> 0 (0.95, miss)
    assert same_cell_precision(emb, labels, 1) == pytest.approx(3 / 5)


@pytest.fixture
def one_thread():
    # Tiny matrices: thread start-up costs more than the work on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_raises_same_cell_precision(tmp_path, one_thread):
    torch.manual_seed(0)
    feats, labels = cell_features(seed=0)
    val_feats, val_labels = cell_features(seed=0, per_cell=6)  # same cells and scenes, new photos
    val_feats = val_feats + 0.3 * np.random.default_rng(9).normal(size=val_feats.shape).astype(np.float32)
    untrained = ResidualRetrievalModule(feats.shape[1], FAST.hidden_dim)
    before = same_cell_precision(untrained.embed(val_feats), val_labels, 5)
    module, summary = fit_retrieval_module(
        _accelerator(tmp_path),
        feats.astype(np.float16),
        labels,
        retrieval_cfg=FAST,
        seed=0,
        out_dir=tmp_path,
        fingerprint="synthetic",
        val_features=val_feats,
        val_labels=val_labels,
        checkpoint_epochs=0,
    )
    after = same_cell_precision(module.embed(val_feats), val_labels, 5)
    assert before < 0.4
    assert after > 0.8
    assert summary["history"][-1]["precision_at_5"] == pytest.approx(after)
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert summary["pairs_per_epoch"] == 20 and summary["ranks_identical"]


def test_resume_continues_exactly(tmp_path, one_thread):
    feats, labels = cell_features(n_cells=12, per_cell=4, dim=8, seed=1)
    cfg = replace(FAST, hidden_dim=16, memory_size=20, epochs=3, batch_size=5)
    torch.manual_seed(0)
    full, _ = fit_retrieval_module(
        _accelerator(tmp_path / "a"),
        feats,
        labels,
        retrieval_cfg=cfg,
        seed=3,
        out_dir=tmp_path / "a",
        fingerprint="f",
    )
    torch.manual_seed(0)
    _, stopped = fit_retrieval_module(
        _accelerator(tmp_path / "b"),
        feats,
        labels,
        retrieval_cfg=cfg,
        seed=3,
        out_dir=tmp_path / "b",
        fingerprint="f",
        max_steps=4,
    )
    assert stopped is None
    torch.manual_seed(123)  # the restored checkpoint, not this seed, decides the weights
    resumed, summary = fit_retrieval_module(
        _accelerator(tmp_path / "b"),
        feats,
        labels,
        retrieval_cfg=cfg,
        seed=3,
        out_dir=tmp_path / "b",
        fingerprint="f",
        resume=True,
    )
    assert len(summary["history"]) == 3
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)
    with pytest.raises(ValueError, match="fingerprint"):
        fit_retrieval_module(
            _accelerator(tmp_path / "b"),
            feats,
            labels,
            retrieval_cfg=cfg,
            seed=3,
            out_dir=tmp_path / "b",
            fingerprint="other",
            resume=True,
        )


def _cells_and_cache(tmp_path, n=400, dim=16):
    from geoswc.geocells import S2Partitioner

    from retrieval_fixture import write_feature_cache

    rng = np.random.default_rng(0)
    centres = np.array([[48.85, 2.35], [40.71, -74.0], [35.68, 139.69], [-33.87, 151.21]])
    latlon = centres[rng.integers(0, 4, n)] + rng.normal(scale=2.0, size=(n, 2))
    cells = (
        S2Partitioner(min_images=5, max_images=(60,), start_level=2).fit(latlon[:, 0], latlon[:, 1]).geocells_
    )
    labels = cells.assign(latlon[:, 0], latlon[:, 1])
    keep = labels[:, -1] >= 0
    latlon, labels = latlon[keep], labels[keep]
    proto = rng.normal(size=(len(cells.fine), dim))
    feats = proto[labels[:, -1]] + rng.normal(size=(len(latlon), dim))
    cells.save(tmp_path / "cells")
    write_feature_cache(tmp_path / "feats", feats, latlon, labels, cells.fingerprint)
    return cells


def test_cli_trains_and_writes_weights(tmp_path):
    from geoswc.cli import main

    cells = _cells_and_cache(tmp_path)
    out = tmp_path / "out"
    rc = main(
        [
            "train",
            "retrieval",
            "--cells",
            str(tmp_path / "cells"),
            "--features",
            str(tmp_path / "feats"),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--cpu",
            "--set",
            "retrieval.hidden_dim=32",
        ]
    )
    assert rc == 0
    module = ResidualRetrievalModule.load(out / "retrieval.safetensors", fingerprint=cells.fingerprint)
    assert (module.dim, module.hidden_dim) == (16, 32)
    summary = json.loads((out / "train_retrieval.json").read_text())
    assert len(summary["history"]) == 2 and (out / "config.yaml").is_file()


@pytest.mark.slow
def test_two_process_training_with_accelerate_launch(tmp_path):
    _cells_and_cache(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        *two_rank_launch(),
        "-m",
        "geoswc.train",
        "retrieval",
        "--cells",
        str(tmp_path / "cells"),
        "--features",
        str(tmp_path / "feats"),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "3",
        "--cpu",
        "--set",
        "retrieval.hidden_dim=32",
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_retrieval.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_identical"]
    assert (out / "retrieval.safetensors").is_file()
