"""Checkpoints are data that travel with shared model folders (`geoswc fit` keeps them under ``work/``): resuming
from one must never run code, and a kill at any point of writing one must leave a checkpoint to resume from."""

import json
import os
import shutil
from pathlib import Path

import pytest
import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from geoswc.config import RetrievalConfig, TrainConfig
from geoswc.train.engine import (
    Checkpointer,
    build_accelerator,
    load_tree,
    save_tree,
    rank_batches,
    seed_everything,
    train_loop,
)
from geoswc.train.retrieval import fit_retrieval_module
from retrieval_fixture import cell_features

RETRIEVAL = RetrievalConfig(hidden_dim=16, memory_size=20, epochs=3, batch_size=5, lr=3e-3)
# What accelerate's ``save_state`` writes and ``load_state`` reads: a loader that still read them would run them.
ACCELERATE_FILES = [
    "model.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "sampler.bin",
    "dl_state_dict.bin",
    "scaler.pt",
    "random_states_0.pkl",
    "custom_checkpoint_0.pkl",
]


class Payload:
    """Unpickling this makes the folder ``marker``: what a hostile checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a torch-saved pickle that runs code when loaded without ``weights_only``."""
    torch.save({"state": Payload(marker)}, path)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_retrieval(out: Path, **kwargs):
    feats, labels = cell_features(n_cells=12, per_cell=4, dim=8, seed=1)
    torch.manual_seed(0)
    accelerator = build_accelerator(TrainConfig(), cpu=True, out_dir=out)
    return fit_retrieval_module(
        accelerator, feats, labels, retrieval_cfg=RETRIEVAL, seed=3, out_dir=out, fingerprint="f", **kwargs
    )


def test_resuming_from_planted_pickles_runs_no_code(tmp_path, one_thread):
    full, _ = fit_retrieval(tmp_path / "full")
    pristine = tmp_path / "pristine"
    assert fit_retrieval(pristine, max_steps=4)[1] is None  # mid epoch 2: the memory holds entries
    last = pristine / "checkpoints" / "retrieval" / "last"
    written = sorted(p.name for p in last.iterdir())
    marker = tmp_path / "code-ran"
    for name in sorted(set(written) | set(ACCELERATE_FILES)):
        run = tmp_path / f"run-{name}"
        shutil.copytree(pristine, run)
        plant(run / "checkpoints" / "retrieval" / "last" / name, marker)
        error = None
        try:
            resumed, summary = fit_retrieval(run, resume=True)
        except Exception as err:  # judged below, once we know no code ran
            error = err
        assert not marker.exists(), f"loading the checkpoint ran the code planted in {name}"
        if name in written:
            # A file of the checkpoint that is not what was written: a clear error that names it.
            assert isinstance(error, ValueError) and name in str(error), f"{name}: {error!r}"
        else:
            # A file the loader does not read: ignored, and the resumed run is the uninterrupted one.
            assert error is None, f"{name}: {error!r}"
            assert len(summary["history"]) == RETRIEVAL.epochs
            for key, value in full.state_dict().items():
                torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_checkpoint_holds_only_safetensors_and_json(tmp_path, one_thread):
    fit_retrieval(tmp_path, max_steps=4)
    files = sorted((tmp_path / "checkpoints" / "retrieval" / "last").iterdir())
    assert {p.suffix for p in files} <= {".safetensors", ".json"}, [p.name for p in files]
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), framework="pt") as f:
                assert all(f.get_tensor(k) is not None for k in f.keys())
    # The cross-batch memory is part of it, as tensors.
    state = load_tree(tmp_path / "checkpoints" / "retrieval" / "last" / "state")
    (memory,) = state["objects"]
    assert memory["memory_embeddings"].shape == (20, 8) and int(memory["memory_count"]) == 20
    assert memory["memory_embeddings"].abs().sum() > 0


def test_state_trees_round_trip_without_pickle(tmp_path):
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3).to(torch.bfloat16)}},
        "param_groups": [{"betas": (0.9, 0.999), "lr": float("nan"), "eps": float("inf"), "fused": None}],
        "rng": (3, tuple(range(5)), None),
        "flags": [True, False, -0.0, 2**70, "text"],
        "empty": torch.zeros(0, 0),
    }
    save_tree(tree, tmp_path / "t")
    back = load_tree(tmp_path / "t")
    assert back["rng"] == (3, (0, 1, 2, 3, 4), None) and back["flags"] == tree["flags"]
    assert list(back["state"]) == [0] and back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert np.isnan(back["param_groups"][0]["lr"]) and back["param_groups"][0]["eps"] == float("inf")
    for key in ("step", "exp_avg"):
        torch.testing.assert_close(back["state"][0][key], tree["state"][0][key], rtol=0, atol=0)
    assert back["empty"].shape == (0, 0)
    with pytest.raises(TypeError, match="cannot checkpoint a Payload"):
        save_tree({"x": Payload(tmp_path / "m")}, tmp_path / "u")
    (tmp_path / "t.json").write_text('{"dict": [[{"list": []}, 1]]}')  # an unhashable key
    with pytest.raises(ValueError, match="t.json is not what geoswc writes"):
        load_tree(tmp_path / "t")


def test_a_tampered_memory_is_refused(tmp_path, one_thread):
    fit_retrieval(tmp_path, max_steps=4)
    stem = tmp_path / "checkpoints" / "retrieval" / "last" / "state"
    state = load_tree(stem)
    state["objects"][0]["memory_count"] = torch.tensor(10**6)  # numbers only, but not a memory of 20
    save_tree(state, stem)
    with pytest.raises(ValueError, match="(?s)state.json does not fit.*memory: 1000000 entries"):
        fit_retrieval(tmp_path, resume=True)


class Killed(BaseException):
    """A kill: nothing in the code under test catches it."""


def kill_between_renames(monkeypatch):
    """Make the rename of ``tmp`` to ``last`` die, as a kill after the rotation's first rename would."""
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def renamed(src, dst, *args, _real=real, **kwargs):
            if Path(src).name == "tmp" and Path(dst).name == "last":
                raise Killed(f"killed before {src} -> {dst}")
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, renamed)


def linear_run(out: Path, *, resume=False, max_steps=None, checkpoint_every=0):
    """train_loop on a linear model: 4 steps per epoch, 3 epochs; returns (weights, steps trained here)."""
    x = torch.arange(24.0).reshape(8, 3) / 10
    y = x.sum(dim=1, keepdim=True)
    accelerator = build_accelerator(TrainConfig(), cpu=True)
    seed_everything(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trained = []

    def batches(epoch, skip):
        rows = rank_batches(8, 2, epoch=epoch, seed=0)
        return len(rows), iter(rows[skip:])

    def loss(rows):
        trained.append(rows)
        rows = torch.from_numpy(rows)
        return ((model(x[rows]) - y[rows]) ** 2).mean(), len(rows)

    train_loop(
        accelerator,
        model,
        optimizer,
        scheduler,
        name="lin",
        out_dir=out,
        epochs=3,
        batches=batches,
        loss=loss,
        resume=resume,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
    )
    return accelerator.unwrap_model(model).weight.detach().clone(), len(trained)


def saved_step(out: Path) -> int:
    ckpt = Checkpointer(build_accelerator(TrainConfig(), cpu=True), out / "checkpoints" / "lin")
    assert ckpt.exists(), "no checkpoint found to resume from"
    return json.loads((ckpt.latest() / "position.json").read_text())["global_step"]


def test_kill_between_the_renames_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    whole, steps = linear_run(tmp_path / "a")
    assert steps == 12
    out = tmp_path / "b"
    linear_run(out, max_steps=5)  # checkpoint at step 5, in epoch 2
    with monkeypatch.context() as patch:
        kill_between_renames(patch)
        with pytest.raises(Killed):
            linear_run(out, resume=True, checkpoint_every=1)  # step 6 trained, killed while checkpointing it
    ckpt_folder = out / "checkpoints" / "lin"
    assert not (ckpt_folder / "last").exists()
    assert saved_step(out) == 5
    # Killed again while the only complete checkpoint is the previous one: it must survive.
    with monkeypatch.context() as patch:
        kill_between_renames(patch)
        with pytest.raises(Killed):
            linear_run(out, resume=True, checkpoint_every=1)
    assert saved_step(out) == 5
    resumed, steps = linear_run(out, resume=True)
    assert steps == 12 - 5  # continued from step 5, not from scratch
    torch.testing.assert_close(resumed, whole, rtol=0, atol=0)
    assert (ckpt_folder / "last" / "position.json").is_file() and not (ckpt_folder / "old").exists()


def test_an_incomplete_checkpoint_is_not_resumed_from(tmp_path):
    out = tmp_path / "b"
    linear_run(out, max_steps=5)
    folder = out / "checkpoints" / "lin"
    # A rotation killed after ``last -> old`` with ``tmp`` half written, then an ``old`` whose removal died.
    (folder / "last").rename(folder / "old")
    (folder / "tmp").mkdir()
    (folder / "tmp" / "meta.json").write_text("{}\n")
    assert saved_step(out) == 5
    (folder / "old" / "position.json").unlink()
    assert not Checkpointer(build_accelerator(TrainConfig(), cpu=True), folder).exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(build_accelerator(TrainConfig(), cpu=True), folder).restore()
    assert sorted(p.name for p in folder.iterdir()) == ["old", "tmp"]  # nothing deleted by looking
