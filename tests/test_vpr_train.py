"""`geoswc vpr train`: triplet mining and the two losses against hand-computed cases, exact resume, two CPU
ranks, the model folder it writes, and one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import two_rank_launch
from vpr_fixtures import TINY_STREETS, fails_in_one_line

from geoswc.cli import main
from geoswc.street.losses import batch_hard_soft_margin_loss, triplet_margin_loss
from geoswc.street.mining import TripletMiner, pair_relations

# A street along x: database photos at these metres, queries at 2 m and 50 m.
DB_X = np.array([0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0])
Q_X = np.array([2.0, 50.0])


def _utm(x):
    return np.stack([x, np.zeros_like(x)], axis=1)


def _unit(deg):
    rad = np.deg2rad(deg)
    return np.array([np.cos(rad), np.sin(rad)], np.float32)


# Descriptors by hand (angles in degrees). Query 0 (2 m) looks most like database photo 2 (10 m) among its
# potential positives 0, 1, 2 (within 10 m); among its negatives 4, 5, 6 (beyond 25 m) the nearest in
# descriptor space are 6 then 4. Photo 3 (20 m) is nearest of all but lies in the 10-25 m band: neither.
DB_DEG = np.array([90.0, 60.0, 15.0, 1.0, 40.0, 120.0, 30.0])
Q_DEG = np.array([0.0, 200.0])


class _Embed:
    def __init__(self):
        self.calls = []

    def __call__(self, q_rows, db_rows):
        self.calls.append((np.asarray(q_rows).tolist(), np.asarray(db_rows).tolist()))
        return np.stack([_unit(Q_DEG[i]) for i in q_rows]), np.stack([_unit(DB_DEG[i]) for i in db_rows])


def test_partial_mining_picks_the_best_positive_and_the_hardest_negatives_by_hand():
    miner = TripletMiner(_utm(Q_X), _utm(DB_X), mining="partial", negatives=2, neg_samples=100)
    assert [p.tolist() for p in miner.hard_positives] == [[0, 1, 2], [5, 6]]
    assert miner.soft_positives[0].tolist() == [0, 1, 2, 3]
    embed = _Embed()
    rows = miner.mine(np.array([0]), embed, np.random.default_rng(0))
    assert rows.tolist() == [[0, 2, 6, 4]]
    # The whole database was sampled (100 >= 7 photos) and embedded once, with the query.
    assert embed.calls == [([0], [0, 1, 2, 3, 4, 5, 6])]


def test_partial_mining_only_searches_the_sampled_database():
    miner = TripletMiner(_utm(Q_X), _utm(DB_X), mining="partial", negatives=1, neg_samples=3)
    embed = _Embed()
    rng = np.random.default_rng(5)
    sampled = np.sort(np.random.default_rng(5).choice(7, 3, replace=False))
    rows = miner.mine(np.array([0]), embed, rng)
    candidates = [i for i in sampled if DB_X[i] > 2.0 + 25.0]
    expected = min(candidates, key=lambda i: np.sum((_unit(DB_DEG[i]) - _unit(0.0)) ** 2))
    assert rows[0, 2] == expected
    assert embed.calls[0][1] == sorted(set(sampled.tolist()) | {0, 1, 2})


def test_full_mining_keeps_the_previous_hardest_negatives():
    miner = TripletMiner(_utm(Q_X), _utm(DB_X), mining="full", negatives=2, neg_samples=1)
    embed = _Embed()
    miner.neg_cache_[0] = [6, 4]  # found at an earlier refresh
    rows = miner.mine(np.array([0]), embed, np.random.default_rng(1))
    assert rows.tolist() == [[0, 2, 6, 4]]  # one random candidate cannot beat the remembered ones
    assert miner.neg_cache_[0].tolist() == [6, 4]
    assert embed.calls == [([0], list(range(7)))]


def test_random_mining_draws_negatives_beyond_the_radius_and_embeds_only_positives():
    miner = TripletMiner(_utm(Q_X), _utm(DB_X), mining="random", negatives=2)
    embed = _Embed()
    rows = miner.mine(np.array([0, 1]), embed, np.random.default_rng(3))
    assert rows[0, 1] == 2 and rows[1, 1] == 5  # 200 deg is nearer 120 deg (photo 5) than 30 deg (photo 6)
    for q, row in zip((0, 1), rows):
        assert all(abs(DB_X[n] - Q_X[q]) > 25 for n in row[2:])
    assert embed.calls == [([0, 1], [0, 1, 2, 5, 6])]


def test_triplet_margin_loss_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6]])
    n = torch.tensor([[[0.0, 1.0], [0.6, 0.8]]])
    d_qp, d_qn = math.sqrt(0.4), [math.sqrt(2.0), math.sqrt(0.8)]
    for margin in (0.1, 0.3):
        expected = sum(max(0.0, d_qp - d + margin) for d in d_qn) / 2
        assert float(triplet_margin_loss(q, p, n, margin=margin)) == pytest.approx(expected, abs=1e-5)
    assert float(triplet_margin_loss(q, p, n, margin=0.3)) == pytest.approx(0.0190, abs=1e-4)


def test_batch_hard_soft_margin_loss_by_hand():
    # Photos at 0, 5, 8 and 100 m; 20 m lies in the band that is neither positive nor negative of 0 and 5.
    positive, negative = pair_relations(_utm(np.array([0.0, 5.0, 8.0, 100.0, 20.0])), 10.0, 25.0)
    assert positive[0].tolist() == [False, True, True, False, False]
    assert negative[0].tolist() == [False, False, False, True, False]
    assert negative[4].tolist() == [False, False, False, True, False]
    emb = torch.tensor(np.stack([_unit(a) for a in (0.0, 60.0, 90.0, 180.0, 10.0)]))
    # anchor 0: farthest positive 90 deg (d = 1), nearest negative 180 deg (d = 2) -> softplus(-1)
    # anchor 1: positives at 60 and 30 deg (d = 0.5, 0.134), negative 120 deg (d = 1.5) -> softplus(-1)
    # anchor 2: positives at 90 and 30 deg (d = 1, 0.134), negative 90 deg (d = 1) -> softplus(0)
    # anchor 3 has no positive, anchor 4 (20 m) neither positive nor any (0, 5, 8 lie within 25 m)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = (2 * softplus(-1.0) + softplus(0.0)) / 3
    value = batch_hard_soft_margin_loss(emb, torch.from_numpy(positive), torch.from_numpy(negative))
    assert float(value) == pytest.approx(expected, abs=1e-6)
    assert float(value) == pytest.approx(0.43989, abs=1e-5)


# ---- training ----------------------------------------------------------------------------------------------

SMALL_WORLD = dict(TINY_STREETS, streets={"train": 2, "val": 1, "test": 1}, image_size=(48, 32))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads wait on each other for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from geoswc.data.synth_street import make_street_world

    folder = tmp_path_factory.mktemp("streets") / "w"
    make_street_world(folder, seed=1, **SMALL_WORLD)
    return folder


def _random_model(pool="gem"):
    import timm

    from geoswc.classifiers.aggregation import VPRNet
    from geoswc.classifiers.backbone import create_backbone
    from geoswc.street.model import LoadedVPR, VPRSpec

    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet", pretrained=False)
    data_config = dict(timm.data.resolve_model_data_config(backbone))
    net = VPRNet(backbone, pool, clusters=4)
    return LoadedVPR(net, data_config, VPRSpec(backbone="test_efficientnet", pool=pool, clusters=4))


def _settings(**kw):
    from geoswc.train.vpr import VPRTrainSettings

    base = dict(
        epochs=2,
        batch_size=2,
        negatives=3,
        cache_refresh=4,
        queries_per_epoch=8,
        places=3,
        freeze_stages=1,
        lr=1e-3,
    )
    return VPRTrainSettings(**{**base, **kw}).check()


def _weights(folder):
    from safetensors.torch import load_file

    return {
        **load_file(str(folder / "backbone.safetensors")),
        **load_file(str(folder / "aggregation.safetensors")),
    }


@pytest.mark.parametrize(
    "kw", [dict(loss="triplet", mining="full", pool="netvlad"), dict(loss="batch-hard", pool="gem")]
)
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(world, tmp_path, kw):
    from geoswc.street.model import from_folder
    from geoswc.train.vpr import train_vpr

    settings = _settings(**kw)
    whole = train_vpr(_random_model(settings.pool), world, tmp_path / "whole", settings, cpu=True)
    assert whole["complete"] and len(whole["history"]) == 2
    # Three steps: inside the second cache refresh of the first epoch (two steps per refresh).
    part = train_vpr(_random_model(settings.pool), world, tmp_path / "part", settings, cpu=True, max_steps=3)
    assert part["complete"] is False
    again = train_vpr(_random_model(settings.pool), world, tmp_path / "part", settings, cpu=True, resume=True)
    assert again["complete"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The interrupted epoch's mean loss covers only the steps after the resume; the next epoch's is whole.
    assert whole["history"][1]["loss"] == again["history"][1]["loss"]
    loaded = from_folder(tmp_path / "whole")
    assert loaded.spec.trained_aggregation and loaded.spec.pool == settings.pool
    best = json.loads((tmp_path / "whole" / "train_vpr.json").read_text())["best_epoch"]
    ranks = [(h["val_recall@5"], h["val_recall@1"]) for h in whole["history"]]
    first_best = ranks.index(max(ranks))  # recall@5, ties broken by recall@1, the first of equals
    assert best["epoch"] == 1 + first_best and best["val_recall@5"] == max(ranks)[0]


def test_channels_last_trains_the_weights_of_the_default_memory_order(world, tmp_path):
    from geoswc.train.vpr import train_vpr

    runs = {}
    for flag in (True, False):
        settings = _settings(pool="gem", epochs=1, queries_per_epoch=4, channels_last=flag)
        train_vpr(_random_model("gem"), world, tmp_path / str(flag), settings, cpu=True)
        runs[flag] = _weights(tmp_path / str(flag))
    start = _random_model("gem").net.backbone.state_dict()
    moved = [k for k in start if k in runs[True] and not torch.equal(start[k], runs[True][k])]
    assert moved  # the run trained something
    for name, value in runs[True].items():
        assert value.is_contiguous()  # saved in the standard order, loadable anywhere
        assert torch.allclose(value, runs[False][name], rtol=1e-3, atol=1e-4), name


def test_a_resumed_run_replaces_links_in_its_folder_instead_of_writing_through_them(world, tmp_path):
    from geoswc.train.vpr import train_vpr

    settings = _settings(pool="gem", epochs=1, queries_per_epoch=4)
    out = tmp_path / "run"
    assert train_vpr(_random_model("gem"), world, out, settings, cpu=True, max_steps=1)["complete"] is False
    outside = tmp_path / "outside.json"
    outside.write_text('{"val_recall@5": -1.0}')
    for name in ("train_vpr.json", "work/best.json", "work/vpr_train_settings.json"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside)
    assert train_vpr(_random_model("gem"), world, out, settings, cpu=True, resume=True)["complete"]
    assert outside.read_text() == '{"val_recall@5": -1.0}'
    for name in ("train_vpr.json", "work/best.json"):
        assert not (out / name).is_symlink() and json.loads((out / name).read_text())


def test_frozen_batchnorm_and_frozen_stages_do_not_move(world, tmp_path):
    from geoswc.train.vpr import train_vpr

    model = _random_model()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    train_vpr(model, world, tmp_path / "m", _settings(loss="batch-hard", epochs=1), cpu=True)
    after = _weights(tmp_path / "m")
    running = [k for k in before if "running_mean" in k]
    assert running and all(torch.equal(before[k], after[k.removeprefix("backbone.")]) for k in running)
    assert torch.equal(before["backbone.conv_stem.weight"], after["conv_stem.weight"])
    assert torch.equal(before["backbone.blocks.0.0.conv.weight"], after["blocks.0.0.conv.weight"])
    assert not torch.equal(before["backbone.blocks.4.0.conv_pw.weight"], after["blocks.4.0.conv_pw.weight"])


def _model_folder(tmp_path):
    from geoswc.classifiers.backbone import save_backbone

    loaded = _random_model()
    return save_backbone(loaded.net.backbone, tmp_path / "start", name="test_efficientnet", fingerprint="")


def test_cli_trains_a_model_that_vpr_evaluate_reads(world, tmp_path):
    out = tmp_path / "m"
    args = ["vpr", "train", str(world), "-o", str(out), "--model", str(_model_folder(tmp_path)), "--cpu"]
    args += ["--loss", "batch-hard", "--epochs", "1", "--set", "places=3", "--set", "freeze_stages=1"]
    assert main(args) == 0
    assert (
        main(["vpr", "evaluate", str(world), "--model", str(out), "-o", str(tmp_path / "ev"), "--quiet"]) == 0
    )
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["settings"]["trained_aggregation"] is True and results["settings"]["pool"] == "gem"
    index = tmp_path / "indexed"
    assert main(["vpr", "index", str(world), "--model", str(out), "-o", str(index), "--quiet"]) == 0
    assert json.loads((index / "vpr.json").read_text())["trained_aggregation"] is True
    assert main(args) == 2  # the folder is not empty: refused without --resume


def test_resize_setting_reads_height_and_width():
    from geoswc.train.vpr import VPRTrainSettings, settings_with

    assert settings_with(VPRTrainSettings(), ["resize=192,256"]).resize == (192, 256)
    assert settings_with(VPRTrainSettings(), ["resize=96x128"]).resize == (96, 128)
    assert settings_with(VPRTrainSettings(), ["resize=none"]).resize is None


def test_bad_inputs_end_in_one_line(world, tmp_path, capsys):
    from geoswc.data.synth_street import make_street_world

    model = ["--model", str(_model_folder(tmp_path))]
    no_val = make_street_world(tmp_path / "noval", **dict(SMALL_WORLD, streets={"train": 1, "test": 1}))
    assert no_val.counts.get("val") is None
    fails_in_one_line(
        capsys, ["vpr", "train", str(tmp_path / "noval"), "-o", str(tmp_path / "a"), *model], "images/val"
    )
    make_street_world(tmp_path / "notrain", **dict(SMALL_WORLD, streets={"val": 1, "test": 1}))
    fails_in_one_line(
        capsys, ["vpr", "train", str(tmp_path / "notrain"), "-o", str(tmp_path / "b"), *model], "images/train"
    )
    args = ["vpr", "train", str(world), "-o", str(tmp_path / "c"), *model]
    fails_in_one_line(capsys, [*args, "--set", "lr_max=3"], "lr_max", "choose one of", "negatives")
    fails_in_one_line(capsys, [*args, "--set", "epochs=two"], "epochs", "int")
    fails_in_one_line(capsys, [*args, "--set", "mining=hard"], "mining", "partial")
    fails_in_one_line(capsys, [*args, "--set", "resize=192"], "resize", "H,W")
    fails_in_one_line(capsys, [*args, "--set", "resize=a,b"], "resize", "H,W")
    for name in ("a", "b", "c"):
        assert not (tmp_path / name / "backbone.safetensors").exists()


def test_two_cpu_ranks_train_identical_weights(world, tmp_path):
    out = tmp_path / "m"
    cmd = [*two_rank_launch(), "-m", "geoswc", "vpr", "train", str(world), "-o", str(out)]
    cmd += ["--model", str(_model_folder(tmp_path)), "--cpu", "--epochs", "1", "--mining", "full"]
    cmd += [
        "--set",
        "batch_size=2",
        "--set",
        "negatives=3",
        "--set",
        "freeze_stages=1",
        "--set",
        "cache_refresh=4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_vpr.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_identical"] is True
    assert (out / "vpr.json").is_file() and (out / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_tiny_preset_triplets_learn_the_training_streets(tmp_path):
    """The default street world: off the shelf, GeM finds few training queries' places (the facade styles repeat
    on every street); a few epochs of triplets with frozen BatchNorm fit them. This is the check that the
    mining and the loss train what they should; docs/place-recognition.md has the test-split figures."""
    from geoswc.data.synth_street import make_street_world
    from geoswc.data.vpr import read_split
    from geoswc.street.embed import Embedder
    from geoswc.street.model import from_folder, off_the_shelf
    from geoswc.train.vpr import VPRTrainSettings, train_vpr, validation_recalls

    make_street_world(tmp_path / "w")
    train = read_split(tmp_path / "w", "train")

    def train_recall(loaded):
        return validation_recalls(Embedder(loaded, size=(96, 128), progress=False), train)["val_recall@1"]

    before = train_recall(off_the_shelf(preset="tiny", pool="gem"))
    train_vpr(
        off_the_shelf(preset="tiny", pool="gem"), tmp_path / "w", tmp_path / "m", VPRTrainSettings(epochs=5)
    )
    model = from_folder(tmp_path / "m")
    # The kept epoch is the best on val, not necessarily the last; the last epoch's checkpoint fits best.
    from safetensors.torch import load_file

    last = load_file(str(tmp_path / "m" / "work" / "checkpoints" / "vpr" / "last" / "model.safetensors"))
    model.net.load_state_dict({k.removeprefix("net."): v for k, v in last.items()})
    after = train_recall(model)
    assert before < 30 and after >= 80 and after - before >= 50, (before, after)
