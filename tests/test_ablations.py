"""The paper's retrieval ablations (section 5.2) as settings: triplet loss, one-directional InfoNCE, same-cell
masking off, memory size, temperature, the module without residual, no retrieval training (identity
embedding), and the background of every training photo. Each is checked against values worked out by hand or
a brute-force loop written independently of the library."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from geoswc.config import Config, RetrievalConfig, TrainConfig, load_preset
from geoswc.retrieval import (
    BackgroundIndex,
    IdentityEmbedding,
    InfoNCEWithMemory,
    ResidualRetrievalModule,
    TripletWithMemory,
    create_retrieval_loss,
    load_retrieval,
)
from retrieval_fixture import cell_features, write_feature_cache


# ------------------------------------------------------------------------------------------- settings
def test_defaults_are_the_papers_choices_and_the_paper_preset_states_them():
    rc = Config().retrieval
    assert (rc.loss, rc.margin, rc.residual, rc.symmetric, rc.mask_same_cell, rc.background) == (
        "infonce",
        0.01,
        True,
        True,
        True,
        "placeable",
    )
    assert (rc.temperature, rc.memory_size) == (0.05, 4096)
    assert load_preset("paper").retrieval == rc
    cfg = Config().override(
        ["retrieval.loss=triplet", "retrieval.residual=false", "retrieval.background=all"]
    )
    assert (cfg.retrieval.loss, cfg.retrieval.residual, cfg.retrieval.background) == ("triplet", False, "all")


def test_loss_factory_builds_each_kind_and_names_the_choices():
    loss = create_retrieval_loss(
        "infonce", temperature=0.1, memory_size=7, symmetric=False, mask_same_cell=False
    )
    assert isinstance(loss, InfoNCEWithMemory)
    assert (loss.temperature, loss.memory_size, loss.symmetric, loss.mask_same_cell) == (0.1, 7, False, False)
    loss = create_retrieval_loss("triplet", margin=0.2, memory_size=3)
    assert isinstance(loss, TripletWithMemory) and (loss.margin, loss.memory_size) == (0.2, 3)
    with pytest.raises(ValueError, match="trains no retrieval module"):
        create_retrieval_loss("none")
    with pytest.raises(
        ValueError, match="unknown retrieval loss 'nce'; choose one of: infonce, triplet, none"
    ):
        create_retrieval_loss("nce")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        TripletWithMemory(margin=-0.1)


# ------------------------------------------------------------------------------------------- triplet
def test_triplet_on_a_hand_written_3x3_similarity_matrix():
    # Three anchors, three keys; anchor i's positive is column i.
    sims = torch.tensor([[0.9, 0.8, 0.95], [0.1, 0.4, 0.7], [0.6, 0.5, 0.2]])
    partner = torch.tensor([0, 1, 2])
    not_negative = torch.zeros(3, 3, dtype=torch.bool)
    loss = TripletWithMemory(margin=0.2, memory_size=0)
    # anchor 0: s_pos 0.9; negatives 0.8, 0.95; semi-hard (< 0.9): 0.8 -> max(0, 0.8 - 0.9 + 0.2) = 0.1
    # anchor 1: s_pos 0.4; negatives 0.1, 0.7; semi-hard: 0.1 -> max(0, 0.1 - 0.4 + 0.2) = 0
    # anchor 2: s_pos 0.2; negatives 0.6, 0.5, none below 0.2 -> the least similar, 0.5: 0.5 - 0.2 + 0.2 = 0.5
    per_anchor = loss.pair_loss(sims, not_negative.clone(), partner)
    torch.testing.assert_close(per_anchor, torch.tensor([0.1, 0.0, 0.5]))
    # Key 1 is no negative of anchor 2 (its own cell): the only negative left is 0.6 -> 0.6 - 0.2 + 0.2 = 0.6.
    masked = not_negative.clone()
    masked[2, 1] = True
    torch.testing.assert_close(loss.pair_loss(sims, masked, partner), torch.tensor([0.1, 0.0, 0.6]))
    # An anchor without any negative adds nothing.
    alone = torch.ones(3, 3, dtype=torch.bool)
    alone[0, 0] = False
    assert loss.pair_loss(sims, alone, partner)[0].item() == 0.0


def test_triplet_forward_by_hand_with_unit_vectors():
    # Two pairs in 2-D from different cells, queries as anchors only, margin 0.3.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    loss = TripletWithMemory(margin=0.3, memory_size=0, symmetric=False)(q, p, torch.tensor([0, 1]))
    # q0: positive p0 0.6; negatives q1 0.0, p1 0.8 -> semi-hard 0.0: max(0, 0 - 0.6 + 0.3) = 0
    # q1: positive p1 0.6; negatives q0 0.0, p0 0.8 -> semi-hard 0.0: 0
    assert loss.item() == pytest.approx(0.0)
    p = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    loss = TripletWithMemory(margin=0.3, memory_size=0, symmetric=False)(q, p, torch.tensor([0, 1]))
    # q0: positive 0.6; negatives q1 0.0, p1 1.0 -> semi-hard 0.0: 0
    # q1: positive p1 0.0; negatives q0 0.0, p0 0.8, none below 0.0 -> least similar 0.0: 0 - 0 + 0.3 = 0.3
    assert loss.item() == pytest.approx(0.15)


def _reference(q, p, labels, mem, mem_labels, *, kind, tau=0.1, margin=0.05, symmetric=True, mask=True):
    """Per-anchor loops over plain Python lists: InfoNCE (eq. 3) or the semi-hard triplet loss."""
    batch = list(zip(q.tolist(), labels.tolist())) + list(zip(p.tolist(), labels.tolist()))
    keys = batch + list(zip(mem.tolist(), mem_labels.tolist()))
    n = len(q)
    anchors = range(2 * n if symmetric else n)
    total = 0.0
    for i in anchors:
        a, cell = batch[i]
        partner = (i + n) % (2 * n)
        s_pos = sum(x * y for x, y in zip(a, batch[partner][0]))
        negatives = [
            sum(x * y for x, y in zip(a, k))
            for j, (k, c) in enumerate(keys)
            if j != partner and j != i and (c != cell or not mask)
        ]
        if kind == "infonce":
            pos = math.exp(s_pos / tau)
            total += -math.log(pos / (pos + sum(math.exp(s / tau) for s in negatives)))
        elif negatives:
            below = [s for s in negatives if s < s_pos]
            s_neg = max(below) if below else min(negatives)
            total += max(0.0, s_neg - s_pos + margin)
    return total / len(anchors)


@pytest.mark.parametrize("kind", ["infonce", "triplet"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mask", [True, False])
def test_losses_match_a_brute_force_loop_with_memory(kind, symmetric, mask):
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    p = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    labels = torch.tensor([2, 1, 2, 0, 4])  # pairs 0 and 2 share a cell
    mem = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    mem_labels = torch.tensor([1, 2, 3, 5, 0, 2])
    criterion = create_retrieval_loss(
        kind, temperature=0.1, margin=0.05, memory_size=8, symmetric=symmetric, mask_same_cell=mask
    )
    criterion.enqueue(mem, mem_labels)
    expected = _reference(q, p, labels, mem, mem_labels, kind=kind, symmetric=symmetric, mask=mask)
    assert criterion(q, p, labels).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_triplet_gradient_pulls_the_positive_and_pushes_the_chosen_negative():
    q = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0, 0.0]])
    loss = TripletWithMemory(margin=0.5, memory_size=4, symmetric=False)
    loss.enqueue(torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]), torch.tensor([7, 8]))
    # s_pos 0; negatives: p 0 is the partner; memory 0.0 and -1.0, both below? 0.0 is not < 0.0, -1.0 is.
    # semi-hard -1.0: loss = -1 - 0 + 0.5 < 0 -> 0, no gradient.
    value = loss(q, p, torch.tensor([3]))
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(q.grad) == 0
    # With margin 1.5: loss = -1 - 0 + 1.5 = 0.5, d/dq = e_neg - p = (-1, 0, 0) - (0, 1, 0).
    q.grad = None
    value = TripletWithMemory(margin=1.5, memory_size=4, symmetric=False)
    value.enqueue(torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]), torch.tensor([7, 8]))
    out = value(q, p, torch.tensor([3]))
    out.backward()
    assert out.item() == pytest.approx(0.5)
    torch.testing.assert_close(q.grad, torch.tensor([[-1.0, -1.0, 0.0]]))


# ------------------------------------------------------------------------------------------- InfoNCE
def test_infonce_without_same_cell_masking_by_hand():
    # Both pairs in cell 0, queries as anchors, tau = 0.5.
    q = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    p = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    masked = InfoNCEWithMemory(0.5, 0, symmetric=False)(q, p, labels)
    # With masking every other key is in the anchor's cell: no negatives, loss 0.
    assert masked.item() == pytest.approx(0.0, abs=1e-7)
    unmasked = InfoNCEWithMemory(0.5, 0, symmetric=False, mask_same_cell=False)(q, p, labels)
    # q0: positive p0 0.6 -> 1.2; negatives q1 0.8 -> 1.6, p1 0.0 -> 0
    l0 = -1.2 + math.log(math.exp(1.2) + math.exp(1.6) + math.exp(0.0))
    # q1: positive p1 0.6 -> 1.2; negatives q0 0.8 -> 1.6, p0 0.96 -> 1.92
    l1 = -1.2 + math.log(math.exp(1.2) + math.exp(1.6) + math.exp(1.92))
    assert unmasked.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_one_and_two_directional_infonce_by_hand():
    # Two pairs, different cells, tau = 1.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 1])
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    q0 = -0.6 + lse(0.6, 0.0, 0.8)  # keys: p0 (positive), q1, p1
    q1 = -0.6 + lse(0.6, 0.0, 0.8)  # p1, q0, p0
    p0 = -0.6 + lse(0.6, 0.8, 0.96)  # q0, q1, p1
    p1 = -0.6 + lse(0.6, 0.8, 0.96)  # q1, q0, p0
    one = InfoNCEWithMemory(1.0, 0, symmetric=False)(q, p, labels)
    two = InfoNCEWithMemory(1.0, 0, symmetric=True)(q, p, labels)
    assert one.item() == pytest.approx((q0 + q1) / 2, rel=1e-6)
    assert two.item() == pytest.approx((q0 + q1 + p0 + p1) / 4, rel=1e-6)


def test_temperature_and_memory_size_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.6, 0.8]])
    older, newer = torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 0.0]])
    for tau, size in ((0.5, 1), (0.25, 2)):
        loss = InfoNCEWithMemory(tau, size, symmetric=False).eval()
        loss.enqueue(older, torch.tensor([5]))
        loss.enqueue(newer, torch.tensor([6]))
        # A memory of one keeps the newer entry only (-1.0); of two, both (0.0 and -1.0).
        negatives = [-1.0] if size == 1 else [0.0, -1.0]
        logits = [0.6 / tau] + [s / tau for s in negatives]
        expected = -logits[0] + math.log(sum(math.exp(x) for x in logits))
        assert loss(q, p, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------- modules
def test_module_without_residual_is_the_written_out_formula_and_round_trips(tmp_path):
    torch.manual_seed(4)
    module = ResidualRetrievalModule(6, hidden_dim=10, residual=False).eval()
    z = torch.randn(3, 6)
    with torch.no_grad():
        x = F.layer_norm(z, (6,), module.norm_in.weight, module.norm_in.bias)
        h = (
            torch.clamp(x @ module.fc1.weight.T + module.fc1.bias, min=0) @ module.fc2.weight.T
            + module.fc2.bias
        )
        y = F.layer_norm(h, (6,), module.norm_out.weight, module.norm_out.bias)
        torch.testing.assert_close(module(z), y / y.norm(dim=1, keepdim=True))
    with_residual = ResidualRetrievalModule(6, hidden_dim=10)
    with_residual.load_state_dict(module.state_dict())
    assert not torch.allclose(with_residual(z), module(z))
    module.save(tmp_path / "r.safetensors", fingerprint="f")
    loaded = load_retrieval(tmp_path / "r.safetensors", fingerprint="f")
    assert isinstance(loaded, ResidualRetrievalModule) and loaded.residual is False
    torch.testing.assert_close(loaded(z), module(z))


def test_identity_embedding_normalises_the_features_and_saves_no_weights(tmp_path):
    z = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]], np.float32)
    module = IdentityEmbedding(3)
    np.testing.assert_allclose(module.embed(z), [[0.6, 0.8, 0.0], [0.0, 0.0, -1.0]], rtol=1e-6)
    path = tmp_path / "retrieval.safetensors"
    module.save(path, fingerprint="abc")
    loaded = load_retrieval(path, fingerprint="abc")
    assert isinstance(loaded, IdentityEmbedding) and loaded.dim == 3 and loaded.fingerprint == "abc"
    with pytest.raises(ValueError, match="identity embedding .*load_retrieval"):
        ResidualRetrievalModule.load(path)
    with pytest.raises(ValueError, match="partition 'abc'.*'zzz'"):
        load_retrieval(path, fingerprint="zzz")
    with pytest.raises(ValueError, match="last dimension 3"):
        module(torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------- stages
@pytest.fixture
def cache(tmp_path):
    """A feature cache on a small partition, a CE head that places most photos, and the evaluation set."""
    from geoswc.classifiers import create_head, save_head
    from geoswc.geocells import S2Partitioner

    rng = np.random.default_rng(0)
    n, dim = 240, 16
    centres = np.array([[48.85, 2.35], [40.71, -74.0], [35.68, 139.69], [-33.87, 151.21]])
    latlon = centres[rng.integers(0, 4, n)] + rng.normal(scale=2.0, size=(n, 2))
    cells = (
        S2Partitioner(min_images=5, max_images=(60,), start_level=2).fit(latlon[:, 0], latlon[:, 1]).geocells_
    )
    labels = cells.assign(latlon[:, 0], latlon[:, 1])
    labels[:3, -1] = -1
    proto = rng.normal(size=(len(cells.fine), dim))
    feats = proto[np.maximum(labels[:, -1], 0)] + 0.8 * rng.normal(size=(n, dim))
    write_feature_cache(
        tmp_path / "feats", feats, latlon, labels, cells.fingerprint, ids=[f"{i}.jpg" for i in range(n)]
    )
    cells.save(tmp_path / "cells")
    head = create_head("ce", in_features=dim, geocells=cells)
    with torch.no_grad():
        head.fc.weight.copy_(torch.from_numpy(proto).float())
    save_head(head, tmp_path / "ce.safetensors")
    pd.DataFrame({"IMG_ID": ["x.jpg"], "AUTHOR": ["a3"], "LAT": [0], "LON": [0]}).to_csv(
        tmp_path / "bench.csv", index=False
    )
    return tmp_path, cells, head, np.asarray(feats, np.float16), labels


def _config(*sets):
    base = [
        "retrieval.hidden_dim=32",
        "retrieval.epochs=2",
        "retrieval.memory_size=64",
        "retrieval.batch_size=16",
    ]
    return Config().override(base + list(sets))


def test_loss_none_trains_nothing_and_the_index_holds_normalised_features(cache):
    from geoswc.train import build_index, train_retrieval

    folder, cells, head, feats, labels = cache
    result = train_retrieval(
        _config("retrieval.loss=none"), cells=cells, features=folder / "feats", out=folder / "r", cpu=True
    )
    assert result.summary["trained"] is False and result.summary["loss"] == "none"
    assert not (folder / "r" / "checkpoints").exists()
    module = load_retrieval(result.files["retrieval"], fingerprint=str(cells.fingerprint))
    assert isinstance(module, IdentityEmbedding) and module.dim == feats.shape[1]

    report = build_index(
        _config("retrieval.loss=none"),
        cells=cells,
        features=folder / "feats",
        head=folder / "ce.safetensors",
        retrieval=result.files["retrieval"],
        out=folder / "index",
        exclude=[folder / "bench.csv"],
        dtype="float32",
    ).summary
    index = BackgroundIndex.load(folder / "index")
    # Brute force: labelled, not by author a3 (rows i % 7 == 3), top-1 of the head is the true cell.
    x = feats.astype(np.float32)
    top1 = x @ head.fc.weight.detach().numpy().T + head.fc.bias.detach().numpy()
    keep = (labels[:, -1] >= 0) & (np.arange(len(x)) % 7 != 3) & (top1.argmax(1) == labels[:, -1])
    assert report["kept"] == keep.sum() == len(index) and report["background"] == "placeable"
    rows = {f"{i}.jpg": i for i in np.flatnonzero(keep)}
    expected = x[[rows[str(i)] for i in index.ids]]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(index.embeddings, np.float32), expected, rtol=1e-6, atol=1e-6)


def test_background_all_keeps_every_labelled_photo_without_a_head(cache):
    from geoswc.train import build_index

    folder, cells, _, feats, labels = cache
    ResidualRetrievalModule(feats.shape[1], 32).save(
        folder / "rrm.safetensors", fingerprint=cells.fingerprint
    )
    report = build_index(
        _config("retrieval.background=all"),
        cells=cells,
        features=folder / "feats",
        head=None,
        retrieval=folder / "rrm.safetensors",
        out=folder / "index_all",
        exclude=[folder / "bench.csv"],
    ).summary
    expected = (labels[:, -1] >= 0) & (np.arange(len(feats)) % 7 != 3)
    assert (report["kept"], report["wrong_cell"], report["background"], report["head"]) == (
        int(expected.sum()),
        0,
        "all",
        None,
    )
    index = BackgroundIndex.load(folder / "index_all")
    assert sorted(index.ids) == sorted(f"{i}.jpg" for i in np.flatnonzero(expected))
    assert json.loads((folder / "index_all" / "build_report.json").read_text())["background"] == "all"
    with pytest.raises(ValueError, match="unknown background 'some'; choose one of: placeable, all"):
        build_index(
            _config("retrieval.background=some"),
            cells=cells,
            features=folder / "feats",
            head=None,
            retrieval=folder / "rrm.safetensors",
            out=folder / "x",
        )
    with pytest.raises(ValueError, match="placeable background needs a head"):
        build_index(
            _config(),
            cells=cells,
            features=folder / "feats",
            head=None,
            retrieval=folder / "rrm.safetensors",
            out=folder / "y",
        )


def test_each_setting_reaches_the_trained_module(tmp_path):
    from geoswc.train.engine import build_accelerator
    from geoswc.train.retrieval import fit_retrieval_module

    feats, labels = cell_features(n_cells=12, per_cell=4, dim=16, seed=1)
    base = RetrievalConfig(hidden_dim=24, memory_size=32, epochs=2, batch_size=6, lr=1e-3)
    variants = {
        "default": {},
        "triplet": {"loss": "triplet"},
        "no_residual": {"residual": False},
        "one_direction": {"symmetric": False},
        "no_masking": {"mask_same_cell": False},
        "small_memory": {"memory_size": 4},
        "temperature": {"temperature": 0.1},
    }
    outputs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, change in variants.items():
            torch.manual_seed(0)
            rc = RetrievalConfig(**{**base.__dict__, **change})
            accelerator = build_accelerator(TrainConfig(), cpu=True, out_dir=tmp_path / name)
            module, summary = fit_retrieval_module(
                accelerator,
                feats,
                labels,
                retrieval_cfg=rc,
                seed=0,
                out_dir=tmp_path / name,
                fingerprint="f",
                checkpoint_epochs=0,
            )
            assert summary["settings"]["loss"] == rc.loss and summary["settings"]["residual"] == rc.residual
            outputs[name] = module.embed(feats[:8])
    finally:
        torch.set_num_threads(threads)
    # Same seed, same pairs: only the setting differs, and each one changes what is learnt.
    for name in variants:
        if name != "default":
            assert not np.allclose(outputs[name], outputs["default"]), name
