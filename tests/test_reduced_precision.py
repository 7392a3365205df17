"""Reduced precision where it agrees (`geoswc.engines.quantize`, `geoswc.engines.agreement`): the agreement
record's arithmetic, int8 graphs that hold int8 arithmetic and stay near float32 on the tiny model's photos,
``--runtime auto`` admitting int8 only where the record meets the rule, and bf16 offered only on CPUs that
compute it natively."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from geoswc import runtime
from geoswc.cli import main
from geoswc.engines import agreement, quantize
from geoswc.engines.choice import MeasuredForward
from geoswc.geolocator import Geolocator
from geoswc.precision import cpu_has_native_bf16

needs_onnx = pytest.mark.skipif(bool(runtime.missing_onnx_packages()), reason="needs onnxruntime and onnx")
KM_PER_DEGREE = 111.19  # one degree of latitude on R = 6371 km


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GEOSWC_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEG files like the tiny model's background photos (`build_tiny_model`: noise tinted by hub)."""
    folder = tmp_path_factory.mktemp("background")
    rng = np.random.default_rng(3)
    for i in range(48):
        hub = i % 6
        tint = np.array([40 * hub % 255, 90, 255 - 30 * hub], dtype=np.float64)
        image = np.clip(tint + rng.normal(scale=40, size=(48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"bg{i:02d}.jpg", quality=92)
    return folder


def photo_paths(folder):
    return sorted(str(p) for p in folder.glob("*.jpg"))


@pytest.fixture(scope="module")
def folder(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model folder this module may write its record into."""
    return shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def fp32_model(folder):
    return Geolocator.from_pretrained(
        folder, device="cpu", precision_mode="fp32", compile="off", runtime="torch"
    )


@pytest.fixture(scope="module")
def measured(fp32_model, photos, tmp_path_factory, folder):
    """A record measured on the tiny model (int8 scheme ``int8`` only, 24 photos compared, 16 calibrated)."""
    import os

    previous = os.environ.get("GEOSWC_CACHE")
    os.environ["GEOSWC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        record = agreement.measure_precisions(
            fp32_model,
            photo_paths(photos),
            compared=24,
            calibration=16,
            schemes=["int8"],
            precisions=["int8"],
        )
    finally:
        if previous is None:
            os.environ.pop("GEOSWC_CACHE")
        else:
            os.environ["GEOSWC_CACHE"] = previous
    record["parts"] = agreement.parts_digest(folder)
    return record


def pixels_of(model, photos, n=8):
    return torch.stack([model.load_pixels(path) for path in photo_paths(photos)[:n]])


# ------------------------------------------------------------------------------------------ arithmetic
def test_agreement_shares_and_the_rule_by_hand():
    n = 200
    cells = np.arange(n) % 7
    latlon = np.column_stack([np.linspace(-60, 60, n), np.linspace(-170, 170, n)])
    # One photo in another cell (199/200 = 99.5 %); two moved by one degree of latitude (111.19 km) and one
    # by 0.005 degrees (0.56 km, still within 1 km): 198/200 = 99 % within 1 km.
    other_cells = cells.copy()
    other_cells[5] += 1
    moved = latlon.copy()
    moved[[10, 20], 0] += 1.0
    moved[30, 0] += 0.005
    entry = agreement.agreement(cells, latlon, other_cells, moved)
    assert entry["photos"] == n
    assert entry["top1_same"] == pytest.approx(0.995)
    assert entry["within_1km"] == pytest.approx(0.99)
    assert entry["max_km"] == pytest.approx(KM_PER_DEGREE, rel=1e-3)
    assert entry["agrees"] is True  # both shares exactly at the rule
    moved[40, 0] += 1.0  # 197/200 within 1 km: 98.5 % < 99 %
    assert agreement.agreement(cells, latlon, other_cells, moved)["agrees"] is False
    other_cells[6] += 1  # 198/200 same cell: 99 % < 99.5 %
    entry = agreement.agreement(cells, latlon, other_cells, latlon)
    assert (
        entry["top1_same"] == pytest.approx(0.99) and entry["within_1km"] == 1.0 and entry["agrees"] is False
    )
    # The rule reads the numbers, never an entry's own verdict.
    assert not agreement.meets_rule({"photos": 10, "top1_same": 0.98, "within_1km": 1.0, "agrees": True})
    assert not agreement.meets_rule({"photos": 10, "top1_same": float("nan"), "within_1km": 1.0})
    with pytest.raises(ValueError, match="the same photos"):
        agreement.agreement(cells, latlon, cells[:-1], latlon[:-1])


def test_split_keeps_calibration_and_compared_photos_apart():
    paths = [f"p{i}.jpg" for i in range(50)]
    calibration, compared = agreement.split_photos(paths, photos=30, calibration=12)
    assert len(calibration) == 12 and len(compared) == 30 and not set(calibration) & set(compared)
    assert agreement.split_photos(paths, photos=30, calibration=12) == (calibration, compared)


# ------------------------------------------------------------------------------------------ int8 graphs
@needs_onnx
def test_quantised_graph_holds_int8_ops_and_stays_near_fp32_on_photos(
    fp32_model, photos, measured, cache, monkeypatch
):
    import onnx

    ranges = quantize.check_ranges(measured["precisions"]["int8"]["ranges"], source="test")
    pixels = pixels_of(fp32_model, photos)
    backbone = fp32_model.backbone
    forward = quantize.QuantizedForward(backbone, ranges, "int8")
    with torch.inference_mode():
        reference = backbone(pixels)
        features = forward(pixels)
    assert forward.failed is None
    graphs = list((cache / "graphs").glob("*.int8.onnx"))
    assert len(graphs) == 1
    graph = onnx.load_from_string(graphs[0].read_bytes())
    ops = quantize.graph_ops(graphs[0].read_bytes())
    assert ops.get("QuantizeLinear", 0) >= 10 and ops.get("DequantizeLinear", 0) >= 10
    int8_weights = [
        t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4
    ]
    assert len(int8_weights) >= ops["Conv"] // 2  # convolution weights stored as int8, per channel
    relative = float(torch.linalg.vector_norm(features - reference) / torch.linalg.vector_norm(reference))
    assert 1e-4 < relative < 0.2  # int8 arithmetic: not float32's features, but close to them
    # Ranges that clip every activation to a hundredth of what the photos reach are far off: the check can fail.
    clipped = {name: (low / 100, high / 100) for name, (low, high) in ranges.items()}
    session = runtime._session(
        quantize.quantize_with_ranges(
            runtime._export(backbone, pixels[:1], dynamic_size=True), clipped, "int8"
        ),
        1,
    )
    bad = torch.from_numpy(session.run(None, {"pixels": pixels.contiguous().numpy()})[0])
    assert (
        float(torch.linalg.vector_norm(bad - reference) / torch.linalg.vector_norm(reference)) > 2 * relative
    )
    # A second forward reads the quantised graph from the cache instead of quantising again.
    calls = []
    monkeypatch.setattr(quantize, "quantize_with_ranges", lambda *a, **k: calls.append(1))
    with torch.inference_mode():
        again = quantize.QuantizedForward(backbone, ranges, "int8")(pixels)
    assert calls == [] and torch.allclose(again, features)


def test_schemes_keep_the_stem_and_last_stage_in_float32(fp32_model):
    pytest.importorskip("onnx")
    graph = runtime._export(fp32_model.backbone, torch.randn(1, 3, 48, 64), dynamic_size=True)
    assert quantize.float_nodes(graph, "int8") == []
    edges = quantize.float_nodes(graph, "int8-edges")
    assert "/conv_stem/Conv" in edges and "/conv_head/Conv" in edges
    assert not any("/blocks.1/" in name for name in edges)
    mixed = set(quantize.float_nodes(graph, "int8-mixed"))
    assert set(edges) < mixed and any("conv_dw" in name or "/se/" in name for name in mixed - set(edges))
    with pytest.raises(
        ValueError, match="unknown int8 scheme 'int4'; choose one of: int8, int8-edges, int8-mixed"
    ):
        quantize.float_nodes(graph, "int4")


# ------------------------------------------------------------------------------------------ auto
def write_with(folder, record, **numbers):
    record = copy.deepcopy(record)
    record["precisions"]["int8"].update(numbers)
    agreement.write_record(folder, record)


@needs_onnx
@pytest.mark.parametrize("top1, admitted", [(0.98, False), (1.0, True)])
def test_auto_admits_int8_only_where_the_record_agrees(folder, measured, photos, top1, admitted, caplog):
    write_with(folder, measured, top1_same=top1, within_1km=1.0, photos=24)
    caplog.set_level("INFO", logger="geoswc.engines.agreement")
    model = Geolocator.from_pretrained(folder, device="cpu", compile="off")
    forward = model._backbone_forward
    assert isinstance(forward, MeasuredForward)
    assert ("onnx-int8" in forward.reduced) is admitted
    assert ("int8 admitted" if admitted else "int8 not admitted: does not agree") in caplog.text
    model.predict(photo_paths(photos)[:4], batch_size=4)
    timed = {m["engine"]: m for m in forward.record["measurements"]}
    assert ("onnx-int8" in timed) is admitted
    if admitted:
        assert timed["onnx-int8"]["agrees"] and timed["onnx-int8"]["error"] is None


@needs_onnx
def test_a_record_of_other_parts_or_versions_admits_nothing(folder, measured, fp32_model):
    write_with(folder, measured, top1_same=1.0, within_1km=1.0)
    record, decisions = agreement.folder_decisions(folder, fp32_model.backbone)
    assert [d.admitted for d in decisions if d.precision == "int8"] == [True]
    other = copy.deepcopy(measured)
    other["parts"] = "0" * 32  # another head or index than the folder's
    agreement.write_record(folder, other)
    _, decisions = agreement.folder_decisions(folder, fp32_model.backbone)
    assert not any(d.admitted for d in decisions) and "other parts" in decisions[0].reason
    other = copy.deepcopy(measured)
    other["versions"]["torch"] = "0.0.1"
    assert "measure again" in agreement.decide(other, fp32_model.backbone)[0].reason
    other = copy.deepcopy(measured)
    other["precisions"]["int8"]["ranges"] = {"x": [1.0, float("inf")]}
    other["precisions"]["int8"]["top1_same"] = other["precisions"]["int8"]["within_1km"] = 1.0
    decision = agreement.decide(other, fp32_model.backbone)[0]
    assert not decision.admitted and "finite" in decision.reason


def test_the_record_is_swapped_in_never_written_through_a_link(folder, measured, tmp_path, caplog):
    target = tmp_path / "elsewhere.json"
    target.write_text("keep")
    path = agreement.record_path(folder)
    path.unlink(missing_ok=True)
    path.symlink_to(target)
    agreement.write_record(folder, measured)
    assert target.read_text() == "keep" and not path.is_symlink()
    assert agreement.read_record(folder)["backbone"] == measured["backbone"]
    path.write_text("[1, 2]")
    assert agreement.read_record(folder) is None and "not an agreement record" in caplog.text


# ------------------------------------------------------------------------------------------ bf16
def bf16_record(measured, engine="torch-bf16"):
    record = copy.deepcopy(measured)
    record["precisions"]["bf16"] = {"engine": engine, "photos": 24, "top1_same": 1.0, "within_1km": 1.0}
    return record


def test_bf16_is_offered_only_on_cpus_with_native_bf16(fp32_model, measured, photos):
    avx2 = frozenset({"avx2", "fma", "avx512f"})
    assert not cpu_has_native_bf16(avx2)
    assert cpu_has_native_bf16(avx2 | {"avx512_bf16"}) and cpu_has_native_bf16(frozenset({"amx_bf16"}))
    record = bf16_record(measured)
    [bf16] = [d for d in agreement.decide(record, fp32_model.backbone, flags=avx2) if d.precision == "bf16"]
    assert not bf16.admitted and "no native bfloat16" in bf16.reason
    [bf16] = [
        d
        for d in agreement.decide(record, fp32_model.backbone, flags=avx2 | {"avx512_bf16"})
        if d.precision == "bf16"
    ]
    assert bf16.admitted and bf16.engine == "torch-bf16"
    pixels = pixels_of(fp32_model, photos)
    with torch.inference_mode():
        features = bf16.factory(fp32_model.backbone)(pixels)
        reference = fp32_model.backbone(pixels)
    relative = float(torch.linalg.vector_norm(features - reference) / torch.linalg.vector_norm(reference))
    assert features.dtype == torch.float32 and 1e-5 < relative < 0.05  # bfloat16 arithmetic, close to fp32
    # A record that says bf16 does not agree is refused even on a native CPU.
    record["precisions"]["bf16"]["top1_same"] = 0.97
    [bf16] = [
        d
        for d in agreement.decide(record, fp32_model.backbone, flags=frozenset({"amx_bf16"}))
        if d.precision == "bf16"
    ]
    assert not bf16.admitted and "does not agree" in bf16.reason


def test_bf16_is_measured_only_where_the_cpu_has_it(fp32_model, photos):
    paths = photo_paths(photos)
    skipped = agreement.measure_precisions(
        fp32_model, paths, compared=8, calibration=4, precisions=["bf16"], flags=frozenset({"avx2"})
    )
    assert skipped["precisions"]["bf16"] == {"measured": False, "reason": "this CPU has no native bfloat16"}
    # With AMX flags faked, bf16 runs (emulated by PyTorch here, so its speed says nothing) and is compared.
    faked = agreement.measure_precisions(
        fp32_model, paths, compared=8, calibration=4, precisions=["bf16"], flags=frozenset({"amx_bf16"})
    )
    entry = faked["precisions"]["bf16"]
    assert entry["engine"] in ("torch-bf16", "openvino-bf16") and entry["photos"] == 8
    assert 0.0 <= entry["top1_same"] <= 1.0 and entry["agrees"] == agreement.meets_rule(entry)


# ------------------------------------------------------------------------------------------ commands
@needs_onnx
@pytest.mark.slow
def test_precision_check_writes_the_record_and_info_explains_it(folder, photos, capsys):
    agreement.record_path(folder).unlink(missing_ok=True)
    assert main(["precision", "show", str(folder)]) == 0
    assert "agreement record: none" in capsys.readouterr().out
    args = [
        "precision",
        "check",
        str(folder),
        "--photos",
        str(photos),
        "--photos-count",
        "16",
        "--calibration",
        "8",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    record = json.loads(agreement.record_path(folder).read_text())
    assert record["photos"] == 16 and record["precisions"]["int8"]["calibration_photos"] == 8
    assert record["parts"] == agreement.parts_digest(folder)
    assert "int8 int8:" in out and "bf16: off" in out
    assert main(["info", "--model", str(folder), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "agreement record (precision.json): 16 photos" in out and "int8: " in out
    with pytest.raises(SystemExit):
        main(["precision", "check", str(folder)])  # --photos is required
    assert main(["precision", "check", str(folder), "--photos", str(folder / "cells")]) != 0
    assert "no photos found" in capsys.readouterr().err


def test_fit_measures_on_the_index_background_photos(tmp_path):
    from geoswc.config import Config
    from geoswc.train.fit import FitRun, _background_photos

    lines = []
    run = FitRun(model_dir=tmp_path / "m", config=Config(), images=tmp_path / "images", echo=lines.append)
    assert _background_photos(run) == []  # no index yet
    (run.stage_dir("index")).mkdir(parents=True)
    (run.stage_dir("index") / "ids.txt").write_text("a/1.jpg\nb/2.jpg\n")
    assert _background_photos(run) == [
        str(tmp_path / "images" / "a/1.jpg"),
        str(tmp_path / "images" / "b/2.jpg"),
    ]
    shards = FitRun(model_dir=tmp_path / "m", config=Config(), shards="x/*.tar", echo=lines.append)
    assert _background_photos(shards) == [] and "in shards" in lines[-1]


@pytest.mark.skipif(bool(runtime.missing_packages("openvino")), reason="needs openvino and onnx")
def test_openvino_bf16_first_photo_is_held_to_a_guard_not_to_float32s_tolerance(
    fp32_model, photos, monkeypatch
):
    from geoswc.engines.openvino import OpenVinoForward

    # Features 2 % off (bfloat16's order of error): float32's check refuses them, bf16's guard lets them run.
    real = OpenVinoForward._infer
    monkeypatch.setattr(OpenVinoForward, "_infer", lambda self, c, a: real(self, c, a) * 1.02)
    pixels = pixels_of(fp32_model, photos, n=2)
    with torch.inference_mode():
        f32 = OpenVinoForward(fp32_model.backbone)
        f32(pixels)
        bf16 = OpenVinoForward(fp32_model.backbone, precision="bf16")
        bf16(pixels)
    assert f32.failed and "differ from PyTorch" in f32.failed
    assert bf16.failed is None
