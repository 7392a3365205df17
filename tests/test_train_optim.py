"""Optimisers and schedules as configuration (`geoswc.train.optim`): the configured path trains the very
weights the hand-written SGD/StepLR and AdamW/cosine did, through the engine's loop, for the same seed."""

import pytest
import torch
from torch import nn

from geoswc.config import BackboneConfig, Config, HeadsConfig, RetrievalConfig, TrainConfig, load_preset
from geoswc.train.engine import build_accelerator, rank_batches, seed_everything, train_loop
from geoswc.train.optim import create_optimizer, create_schedule


def _model() -> nn.Module:
    # Biases and BatchNorm weights: the parameters timm exempts from weight decay unless told not to.
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


def _train(tmp_path, make_optimizer, *, epochs=3, batch_size=8, trainable=None):
    """Weights and per-epoch learning rates after ``epochs`` of `train_loop` with ``make_optimizer(params,
    steps_per_epoch) -> (optimizer, scheduler, schedule_per)``."""
    accelerator = build_accelerator(TrainConfig(), cpu=True, out_dir=tmp_path)
    seed_everything(0)
    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad] if trainable else model.parameters()
    steps_per_epoch = len(rank_batches(len(x), batch_size, epoch=0, seed=0))
    optimizer, scheduler, schedule_per = make_optimizer(params, steps_per_epoch * epochs)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def batches(epoch, skip):
        rows = rank_batches(len(x), batch_size, epoch=epoch, seed=0)
        return len(rows), iter(rows[skip:])

    summary = train_loop(
        accelerator,
        model,
        optimizer,
        scheduler,
        name="optim",
        out_dir=tmp_path,
        epochs=epochs,
        batches=batches,
        loss=lambda rows: (nn.functional.cross_entropy(model(x[rows]), y[rows]), len(rows)),
        schedule_per=schedule_per,
    )
    weights = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return weights, [record["lr"] for record in summary["history"]]


def _assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key
    assert a[1] == b[1]


def test_backbone_sgd_and_step_schedule_train_identical_weights(tmp_path):
    bc = BackboneConfig(lr_step_epochs=1, lr_gamma=0.5)

    def by_hand(params, steps):
        optimizer = torch.optim.SGD(params, lr=bc.lr, momentum=bc.momentum, weight_decay=bc.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=bc.lr_step_epochs, gamma=bc.lr_gamma)
        return optimizer, scheduler, "epoch"

    def configured(params, steps):
        optimizer = create_optimizer(
            params, opt=bc.opt, lr=bc.lr, momentum=bc.momentum, weight_decay=bc.weight_decay
        )
        scheduler, per = create_schedule(
            optimizer, bc.sched, total_updates=steps, step_epochs=bc.lr_step_epochs, gamma=bc.lr_gamma
        )
        return optimizer, scheduler, per

    old, new = _train(tmp_path / "old", by_hand), _train(tmp_path / "new", configured)
    _assert_same(old, new)
    # Stepped per epoch: 0.01 during epoch 1, halved after each epoch (hand-computed).
    assert new[1] == [0.005, 0.0025, 0.00125]


@pytest.mark.parametrize("section", [HeadsConfig(lr=3e-3), RetrievalConfig(lr=1e-3)])
def test_adamw_and_cosine_per_update_train_identical_weights(tmp_path, section):
    def by_hand(params, steps):
        optimizer = torch.optim.AdamW(params, lr=section.lr, weight_decay=section.weight_decay)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps), "step"

    def configured(params, steps):
        optimizer = create_optimizer(
            params, opt=section.opt, lr=section.lr, weight_decay=section.weight_decay
        )
        scheduler, per = create_schedule(optimizer, section.sched, total_updates=steps)
        return optimizer, scheduler, per

    old = _train(tmp_path / "old", by_hand, trainable=True)
    new = _train(tmp_path / "new", configured, trainable=True)
    _assert_same(old, new)
    # Stepped per update: the cosine reaches 0 at the last of the 3 x 6 updates.
    assert new[1][-1] == pytest.approx(0.0, abs=1e-12) and new[1][0] > new[1][1] > 0


def test_weight_decay_applies_to_every_parameter():
    model = _model()
    optimizer = create_optimizer(model, opt="momentum", lr=0.01, weight_decay=1e-4)
    assert isinstance(optimizer, torch.optim.SGD) and not optimizer.defaults["nesterov"]
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))
    assert isinstance(create_optimizer(model, opt="adamw", lr=1e-5, weight_decay=1e-4), torch.optim.AdamW)


def test_defaults_and_paper_preset_are_the_papers_optimisers():
    for cfg in (Config(), load_preset("paper")):
        assert (cfg.backbone.opt, cfg.backbone.lr, cfg.backbone.momentum, cfg.backbone.sched) == (
            "momentum",
            0.01,
            0.9,
            "step",
        )
        assert (cfg.backbone.lr_step_epochs, cfg.backbone.lr_gamma) == (5, 0.5)
        for section in (cfg.heads, cfg.retrieval):
            assert (section.opt, section.lr, section.weight_decay, section.sched) == (
                "adamw",
                1e-5,
                1e-4,
                "cosine",
            )


def test_unknown_optimizer_or_schedule_names_the_choices():
    model = _model()
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'; choose one of: .*adamw"):
        create_optimizer(model, opt="adamx", lr=0.1, weight_decay=0.0)
    optimizer = create_optimizer(model, opt="adamw", lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="unknown schedule 'poly'; choose one of: step, cosine"):
        create_schedule(optimizer, "poly")
