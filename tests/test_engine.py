import csv

import numpy as np
import pytest
import torch
from torch import nn

from geoswc.config import TrainConfig
from geoswc.train.engine import (
    Checkpointer,
    EpochProgress,
    TrainPosition,
    build_accelerator,
    current_lr,
    gather_rows,
    rank_batches,
    seed_everything,
    train_loop,
    use_cpu,
)


def test_rank_batches_split_one_permutation_between_ranks():
    ranks = [rank_batches(103, 8, epoch=3, seed=1, num_processes=2, process_index=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 51 // 8
    rows = np.concatenate([np.concatenate(b) for b in ranks])
    assert len(set(rows.tolist())) == len(rows)  # no row on two ranks
    again = rank_batches(103, 8, epoch=3, seed=1, num_processes=2, process_index=0)
    assert all((a == b).all() for a, b in zip(ranks[0], again))
    other_epoch = rank_batches(103, 8, epoch=4, seed=1, num_processes=2, process_index=0)
    assert not all((a == b).all() for a, b in zip(ranks[0], other_epoch))
    full = rank_batches(10, 4, epoch=0, seed=0, drop_last=False)
    assert sorted(np.concatenate(full).tolist()) == list(range(10)) and [len(b) for b in full] == [4, 4, 2]


def run_loop(out, *, stop_after=None, resume=False, epochs=3):
    """A small training loop built from the engine the way the stages use it; dropout consumes RNG."""
    accelerator = build_accelerator(TrainConfig(), cpu=True, out_dir=out)
    seed_everything(0)
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpt = Checkpointer(accelerator, out / "checkpoints", every_steps=1, meta={"fingerprint": "abc"})
    position = ckpt.restore() if resume else TrainPosition()
    for epoch in range(position.epoch, epochs):
        batches = rank_batches(len(x), 8, epoch=epoch, seed=0)
        bar = EpochProgress(accelerator, len(batches), epoch=epoch, epochs=epochs)
        for step, idx in enumerate(batches):
            if step < position.step:
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            position.advance()
            bar.update(len(idx), loss=loss.item(), lr=current_lr(optimizer))
            if ckpt.due(position):
                ckpt.save(position)
            if stop_after is not None and position.global_step == stop_after:
                return None
        bar.close()
        position.next_epoch()
    return {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}, current_lr(
        optimizer
    )


def test_resume_continues_exactly(tmp_path):
    straight, lr = run_loop(tmp_path / "a")
    assert run_loop(tmp_path / "b", stop_after=7) is None  # mid-epoch 1 (5 steps per epoch)
    resumed, lr_resumed = run_loop(tmp_path / "b", resume=True)
    assert lr_resumed == lr == 0.1 * 0.5**3
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_restore_refuses_other_partition(tmp_path):
    run_loop(tmp_path, stop_after=2)
    accelerator = build_accelerator(TrainConfig(), cpu=True)
    with pytest.raises(ValueError, match="fingerprint='abc' but this run has fingerprint='xyz'"):
        Checkpointer(accelerator, tmp_path / "checkpoints", meta={"fingerprint": "xyz"}).restore()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(accelerator, tmp_path / "elsewhere").restore()


def test_csv_tracker_and_gather(tmp_path):
    accelerator = build_accelerator(
        TrainConfig(), cpu=True, out_dir=tmp_path, log_with=["csv"], run_name="heads"
    )
    accelerator.log({"loss": 0.5, "acc_2500km": 0.25}, step=3)
    accelerator.end_training()
    rows = list(csv.reader((tmp_path / "logs" / "heads" / "metrics.csv").open()))
    assert rows == [["step", "name", "value"], ["3", "loss", "0.5"], ["3", "acc_2500km", "0.25"]]
    got = gather_rows(accelerator, {"a": torch.arange(4)})
    assert got["a"].tolist() == [0, 1, 2, 3]  # one process: gathering is the identity


def test_bad_settings_name_the_choices():
    with pytest.raises(ValueError, match="unknown mixed_precision 'fp8'; choose one of: no, fp16, bf16"):
        build_accelerator(TrainConfig(mixed_precision="fp8"), cpu=True)
    with pytest.raises(ValueError, match="unknown tracker 'wandb'; choose one of: tensorboard, csv"):
        build_accelerator(TrainConfig(), cpu=True, out_dir=".", log_with=["wandb"])


def test_launched_ranks_without_a_gpu_run_on_cpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert use_cpu(True) and not use_cpu(False)  # one process: accelerate picks the device itself
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert use_cpu(False)  # else every rank would be a world of its own
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not use_cpu(False) and use_cpu(True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert use_cpu(False)


def test_train_loop_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    x = torch.arange(24.0).reshape(8, 3) / 10
    y = x.sum(dim=1, keepdim=True)

    def run(out, *, max_steps=None, resume=False):
        accelerator = build_accelerator(TrainConfig(), cpu=True)
        seed_everything(0)
        model = nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

        def batches(epoch, skip):
            rows = rank_batches(8, 2, epoch=epoch, seed=0)
            return len(rows), iter(rows[skip:])

        def loss(rows):
            rows = torch.from_numpy(rows)
            return ((model(x[rows]) - y[rows]) ** 2).mean(), len(rows)

        summary = train_loop(
            accelerator,
            model,
            optimizer,
            scheduler,
            name="lin",
            out_dir=out,
            epochs=3,
            batches=batches,
            loss=loss,
            schedule_per="epoch",
            resume=resume,
            max_steps=max_steps,
        )
        return summary, accelerator.unwrap_model(model)

    full, whole = run(tmp_path / "a")
    stopped, _ = run(tmp_path / "b", max_steps=6)  # 4 steps per epoch: stopped in epoch 2
    assert stopped is None
    resumed, pieced = run(tmp_path / "b", resume=True)
    torch.testing.assert_close(pieced.weight, whole.weight, rtol=0, atol=0)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    # StepLR(0.5) stepped once per epoch: the rate after each epoch.
    assert [r["lr"] for r in full["history"]] == [0.05, 0.025, 0.0125]
    losses = [r["loss"] for r in full["history"]]
    assert losses == sorted(losses, reverse=True) and resumed["history"][0]["loss"] == losses[0]
    assert full["ranks_identical"] and full["num_processes"] == 1
    assert (tmp_path / "b" / "history_lin.json").is_file()
