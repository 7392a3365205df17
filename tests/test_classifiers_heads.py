import math

import numpy as np
import pytest
import torch

from geoswc.classifiers import (
    CEHead,
    HCHead,
    MvMFHead,
    create_head,
    load_head,
    save_head,
    vmf_log_density,
    vmf_log_normalizer,
)
from geoswc.classifiers.base import latlon_to_unit, unit_to_latlon

from cells_fixture import HandCells


def set_linear(linear, bias):
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def log_softmax_np(v):
    v = np.asarray(v, dtype=np.float64)
    return v - np.log(np.exp(v - v.max()).sum()) - v.max()


def test_hc_product_inference_on_hand_hierarchy():
    cells = HandCells()
    head = create_head("hc", in_features=4, geocells=cells)
    # Zero weights: logits equal the biases whatever the features.
    coarse, middle, fine = [0.0, 2.0], [1.0, 0.0, 3.0], [3.0, 2.9, 0.0, 1.0, -1.0]
    for fc, bias in zip(head.fcs, (coarse, middle, fine)):
        set_linear(fc, bias)
    out = head(torch.randn(2, 4))
    got = head.fine_log_probs(out)[0].detach().double().numpy()
    lc, lm, lf = log_softmax_np(coarse), log_softmax_np(middle), log_softmax_np(fine)
    # fine cell -> (coarse, middle) parents, by hand; cell 4 has no coarse parent: its factor is 1.
    expected = [
        lf[0] + lm[0] + lc[0],
        lf[1] + lm[0] + lc[0],
        lf[2] + lm[1] + lc[0],
        lf[3] + lm[2] + lc[1],
        lf[4] + lm[2],
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The fine head alone picks cell 0; the product picks cell 3 (its parents are far more likely).
    assert int(np.argmax(lf)) == 0
    assert head.predict_cell(out).tolist() == [3, 3]
    np.testing.assert_allclose(head.predict_latlon(out).detach().numpy(), [[-20.0, 100.0]] * 2)


def test_hc_loss_is_mean_of_granularity_cross_entropies():
    torch.manual_seed(0)
    head = create_head("hc", in_features=4, geocells=HandCells())
    out = head(torch.randn(3, 4))
    labels = torch.tensor([[0, 1, 2], [1, 2, 3], [-1, 2, 4]])
    c, m, f = torch.split(out["logits"], [2, 3, 5], dim=1)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(c[:2], labels[:2, 0]) + ce(m, labels[:, 1]) + ce(f, labels[:, 2])) / 3
    torch.testing.assert_close(head.loss(out, labels, torch.zeros(3, 2)), expected)


def test_ce_head_ignores_photos_outside_every_cell():
    torch.manual_seed(0)
    head = create_head("ce", in_features=4, geocells=HandCells())
    out = head(torch.randn(4, 4))
    labels = torch.tensor([[0, 0, 1], [0, 0, -1], [1, 2, 3], [0, 1, 2]])
    keep = [0, 2, 3]
    expected = torch.nn.functional.cross_entropy(out["logits"][keep], labels[keep, 2])
    torch.testing.assert_close(head.loss(out, labels, torch.zeros(4, 2)), expected)
    torch.testing.assert_close(head.fine_log_probs(out).exp().sum(1), torch.ones(4))


def test_unknown_head_names_the_choices():
    with pytest.raises(ValueError, match="unknown head 'vmff'; choose one of: ce, hc, mvmf"):
        create_head("vmff", in_features=4, geocells=HandCells())


@pytest.mark.parametrize("kappa", [0.1, 1.0, 10.0, 100.0])
def test_vmf_density_integrates_to_one_over_the_sphere(kappa):
    # Midpoint rule on a 0.2 degree lat/lon grid, area element cos(lat) dlat dlon.
    step = math.radians(0.2)
    lat = torch.arange(-math.pi / 2 + step / 2, math.pi / 2, step, dtype=torch.float64)
    lon = torch.arange(-math.pi + step / 2, math.pi, step, dtype=torch.float64)
    mu_deg = torch.tensor([[33.0, -47.0]], dtype=torch.float64)
    mu = latlon_to_unit(mu_deg)
    total = 0.0
    for lat_row in lat.split(300):
        grid = torch.stack(torch.meshgrid(lat_row, lon, indexing="ij"), -1).reshape(-1, 2)
        x = latlon_to_unit(torch.rad2deg(grid))
        dens = vmf_log_density(x, mu, torch.tensor([math.log(kappa)], dtype=torch.float64)).exp()[:, 0]
        total += float((dens * torch.cos(grid[:, 0])).sum()) * step * step
    assert total == pytest.approx(1.0, abs=2e-4)


def test_vmf_normalizer_matches_sinh_formula_and_series():
    kappas = np.array([1e-6, 1e-4, 1e-3, 0.01, 0.5, 3.0, 50.0, 300.0])
    expected = np.log(kappas) - np.log(4 * np.pi) - np.log(np.sinh(kappas))
    got = vmf_log_normalizer(torch.tensor(np.log(kappas))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_vmf_is_finite_and_exact_at_kappa_e20(dtype, rtol):
    log_kappa = torch.tensor([20.0], dtype=dtype)
    # Points at the mean and 100 m / 1 km north of it (1 degree = 111.19 km on R = 6371 km).
    offsets_km = np.array([0.0, 0.1, 1.0])
    latlon = torch.tensor([[45.0 + d / 111.19, 7.0] for d in offsets_km], dtype=torch.float64)
    x = latlon_to_unit(latlon).to(dtype)
    mu = x[:1]
    got = vmf_log_density(x, mu, log_kappa)[:, 0].double()
    # For huge kappa: log k - log 2 pi - k (1 - cos angle), with 1 - cos = 2 sin^2(angle / 2).
    angle = np.radians(offsets_km / 111.19)
    expected = 20.0 - math.log(2 * math.pi) - math.exp(20) * 2 * np.sin(angle / 2) ** 2
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected, rtol=rtol)
    lk = log_kappa.clone().requires_grad_()
    vmf_log_density(x, mu, lk).sum().backward()
    assert torch.isfinite(lk.grad).all()


def mvmf_nll_float64(weight, bias, log_kappa, means_xyz, features, latlon_deg):
    """-mean_b log sum_i w_i(b) kappa_i / (4 pi sinh kappa_i) exp(kappa_i mu_i . x_b), straight from eq. 1-2."""
    logits = features @ weight.T + bias
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    lat, lon = np.radians(latlon_deg).T
    x = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)
    kappa = np.exp(log_kappa)
    dens = kappa / (4 * np.pi * np.sinh(kappa)) * np.exp(kappa * (x @ means_xyz.T))
    return -np.mean(np.log((w * dens).sum(1)))


def test_mvmf_loss_equals_direct_float64_formula():
    torch.manual_seed(0)
    cells = HandCells()
    head = create_head("mvmf", in_features=6, geocells=cells, init_kappa=5.0)
    with torch.no_grad():
        head.log_kappa.copy_(torch.log(torch.tensor([2.0, 8.0, 30.0, 0.5, 60.0])))
    features = torch.randn(7, 6)
    latlon = torch.tensor(
        [[10, 4], [11, 6], [0, 0], [-20, 101], [60, -150], [-80, 30], [10, 15.0]], dtype=torch.float64
    )
    loss = head.loss(head(features), torch.zeros(7, 3, dtype=torch.long), latlon)
    expected = mvmf_nll_float64(
        head.fc.weight.double().detach().numpy(),
        head.fc.bias.double().detach().numpy(),
        head.log_kappa.double().detach().numpy(),
        head.means.double().numpy(),
        features.double().numpy(),
        latlon.numpy(),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mvmf_gradients_reach_weights_means_and_kappa():
    torch.manual_seed(0)
    head = create_head("mvmf", in_features=6, geocells=HandCells(), train_means=True)
    assert isinstance(head.means, torch.nn.Parameter)
    latlon = torch.tensor([[10.0, 4.5], [-19.0, 99.0], [61.0, -149.0]], dtype=torch.float64)
    head.loss(head(torch.randn(3, 6)), torch.zeros(3, 3, dtype=torch.long), latlon).backward()
    for name in ("fc.weight", "fc.bias", "means", "log_kappa"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    fixed = create_head("mvmf", in_features=6, geocells=HandCells())
    assert "means" not in dict(fixed.named_parameters())


def test_mvmf_prediction_is_centre_of_heaviest_component_and_init_from_ce():
    torch.manual_seed(0)
    cells = HandCells()
    ce = create_head("ce", in_features=4, geocells=cells)
    set_linear(ce.fc, [0.0, 0.0, 0.0, 0.0, 5.0])
    head = create_head("mvmf", in_features=4, geocells=cells).init_from_classifier(ce)
    out = head(torch.randn(3, 4))
    torch.testing.assert_close(head.fine_log_probs(out), ce.fine_log_probs(ce(torch.randn(3, 4))))
    np.testing.assert_allclose(head.predict_latlon(out).detach().numpy(), [[60.0, -150.0]] * 3)
    trainable = create_head("mvmf", in_features=4, geocells=cells, train_means=True).init_from_classifier(ce)
    np.testing.assert_allclose(
        trainable.predict_latlon(trainable(torch.randn(1, 4))).detach().numpy(), [[60.0, -150.0]], atol=1e-4
    )


def test_latlon_unit_round_trip():
    latlon = torch.tensor(
        [[0.0, 0.0], [45.0, 170.0], [-89.0, -179.5], [12.345678, -98.765432]], dtype=torch.float64
    )
    torch.testing.assert_close(unit_to_latlon(latlon_to_unit(latlon)), latlon)


@pytest.mark.parametrize("kind", ["ce", "hc", "mvmf"])
def test_head_save_load_round_trip_and_partition_check(tmp_path, kind):
    torch.manual_seed(0)
    options = {"train_means": True, "init_kappa": 3.0} if kind == "mvmf" else {}
    head = create_head(kind, in_features=5, geocells=HandCells(), **options)
    path = save_head(head, tmp_path / f"{kind}.safetensors", config={"heads": {"lr": 1e-5}})
    loaded = load_head(path, geocells=HandCells())
    assert type(loaded) is type(head) and loaded.options == head.options
    features = torch.randn(3, 5)
    torch.testing.assert_close(loaded.fine_log_probs(loaded(features)), head.fine_log_probs(head(features)))
    torch.testing.assert_close(loaded.predict_latlon(loaded(features)), head.predict_latlon(head(features)))
    with pytest.raises(ValueError, match="trained on partition 'hand-v1'.*'hand-v2'"):
        load_head(path, geocells=HandCells(fingerprint="hand-v2"))


def test_head_classes_registered():
    assert {CEHead.kind, HCHead.kind, MvMFHead.kind} == {"ce", "hc", "mvmf"}
