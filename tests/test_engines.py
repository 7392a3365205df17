"""The CPU engines (`geoswc.engines`): OpenVINO computes PyTorch's features; ``--runtime auto`` measures the
engines once per machine and model, keeps the fastest that agrees, stores the choice under the cache folder
(keyed by CPU, ISA flags, model fingerprint, input shape and versions) and explains it in a printed table;
exported graphs are kept on disk, so a second run does not export again."""

import json

import pytest
import timm
import torch

from geoswc import runtime
from geoswc.cli import main
from geoswc.engines import choice, graphs
from geoswc.engines.choice import Measurement, MeasuredForward, choose, format_record, measure
from geoswc.runtime import OnnxForward, resolve_runtime

needs_onnx = pytest.mark.skipif(bool(runtime.missing_onnx_packages()), reason="needs onnxruntime and onnx")
needs_openvino = pytest.mark.skipif(
    bool(runtime.missing_packages("openvino")), reason="needs openvino and onnx (geoswc[openvino])"
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GEOSWC_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()


def relative_difference(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_cache_folder_honours_the_override_then_xdg_then_home(monkeypatch, tmp_path):
    from geoswc.data.files import cache_dir

    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("GEOSWC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "geoswc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "geoswc"


@needs_openvino
@pytest.mark.parametrize(
    "name", ["test_efficientnet", pytest.param("tf_efficientnet_lite0", marks=pytest.mark.slow)]
)
def test_openvino_computes_pytorchs_features_at_every_size(name):
    from geoswc.engines.openvino import OpenVinoForward

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    forward = OpenVinoForward(model)
    with torch.inference_mode():
        for shape in [(3, 3, 65, 81), (1, 3, 81, 65), (2, 3, 65, 81)]:
            pixels = torch.randn(shape)
            assert relative_difference(forward(pixels), model(pixels)) < 1e-5
    assert forward.failed is None
    # timm's tf_ models pad by amounts computed from the size: one graph per size, as in ONNX Runtime.
    assert forward.exports == ([None] if name == "test_efficientnet" else [(65, 81), (81, 65)])
    with pytest.raises(ValueError, match="unknown OpenVINO precision 'fp8'; choose one of: f32, bf16"):
        OpenVinoForward(model, precision="fp8")


@needs_openvino
def test_runtime_openvino_is_checked_like_onnx(monkeypatch):
    assert resolve_runtime("openvino", "cpu", torch.float32) == "openvino"
    with pytest.raises(ValueError, match="runtime 'openvino' runs the backbone on the CPU"):
        resolve_runtime("openvino", "cuda", torch.float32)
    monkeypatch.setattr(runtime, "missing_packages", lambda name: ("openvino",))
    with pytest.raises(ValueError, match=r"needs the package\(s\) openvino: pip install openvino"):
        resolve_runtime("openvino", "cpu", torch.float32)
    # auto with no CPU engine installed: PyTorch, without measuring.
    assert resolve_runtime("auto", "cpu", torch.float32) == "torch"


@needs_onnx
def test_a_second_forward_reads_the_exported_graph_instead_of_exporting(small_model, monkeypatch, cache):
    calls = []
    export = runtime._export
    monkeypatch.setattr(runtime, "_export", lambda *a, **k: calls.append(1) or export(*a, **k))
    pixels = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        first = OnnxForward(small_model)(pixels)
        second = OnnxForward(small_model)(pixels)
    assert len(calls) == 1 and len(list((cache / "graphs").glob("*.onnx"))) == 1
    assert torch.equal(first, second)
    # Other weights are another network: exported again, into another file.
    other = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    with torch.inference_mode():
        OnnxForward(other)(pixels)
    assert len(calls) == 2 and len(list((cache / "graphs").glob("*.onnx"))) == 2


def test_fingerprint_follows_the_weights(small_model):
    fingerprint = graphs.model_fingerprint(small_model)
    assert graphs.model_fingerprint(small_model) == fingerprint
    changed = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    changed.load_state_dict(small_model.state_dict())
    assert graphs.model_fingerprint(changed) == fingerprint
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert graphs.model_fingerprint(changed) != fingerprint


def test_the_fastest_engine_that_agrees_is_chosen():
    measurements = [
        Measurement("torch", images_per_s=10.0, agrees=True),
        Measurement("onnx", images_per_s=30.0, agrees=True),
        Measurement("openvino", images_per_s=50.0, difference=0.2, agrees=False),
    ]
    assert choose(measurements) == "onnx"
    measurements[1].error = "RuntimeError: broken"
    assert choose(measurements) == "torch"


@needs_onnx
def test_an_engine_that_disagrees_is_measured_but_not_chosen(small_model, monkeypatch):
    # ONNX Runtime made to return other features (beyond the tolerance): reported, never chosen.
    monkeypatch.setattr(
        OnnxForward, "_infer", lambda self, session, array: session.run(None, {"pixels": array})[0] * 1.1
    )
    measurements, forwards = measure(small_model, torch.randn(2, 3, 64, 80), ["torch", "onnx"], min_rounds=1)
    onnx = measurements[1]
    assert onnx.engine == "onnx" and not onnx.agrees
    # The first-photo check inside the forward catches it too; the engine is reported as failed.
    assert onnx.error and "differ from PyTorch" in onnx.error
    assert choose(measurements) == "torch"


@needs_onnx
@pytest.mark.slow
def test_the_choice_is_stored_and_measured_again_when_the_key_changes(small_model, monkeypatch, cache):
    measured = []
    real = choice.measure
    monkeypatch.setattr(choice, "measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    pixels = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        first = MeasuredForward(small_model)
        features = first(pixels)
        assert relative_difference(features, small_model(pixels)) < 1e-5
        assert len(measured) == 1 and first.chosen in choice.available_engines()
        files = list((cache / "engines").glob("*.json"))
        assert len(files) == 1
        record = json.loads(files[0].read_text())
        assert record["chosen"] == first.chosen
        assert record["fields"]["input"] == [2, 3, 64, 80]
        assert record["fields"]["model"] == graphs.model_fingerprint(small_model)
        assert {m["engine"] for m in record["measurements"]} == set(choice.available_engines())

        # Same machine, model and shape: read, not measured.
        second = MeasuredForward(small_model)
        second(pixels)
        assert len(measured) == 1 and second.chosen == first.chosen

        # Another batch shape, or another CPU (ISA flags), is another key: measured again.
        MeasuredForward(small_model)(torch.randn(3, 3, 64, 80))
        assert len(measured) == 2
        box = choice.machine()
        monkeypatch.setattr(choice, "machine", lambda: {**box, "isa": box["isa"] + ["amx_bf16"]})
        MeasuredForward(small_model)(pixels)
        assert len(measured) == 3
        assert len(list((cache / "engines").glob("*.json"))) == 3


def test_a_stale_or_broken_record_is_measured_again(small_model, cache):
    fields = choice.choice_fields(small_model, (1, 3, 32, 32))
    path = choice.choice_path(choice.choice_key(fields))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert choice.load_record(fields) is None
    path.write_text(
        json.dumps({"fields": {**fields, "model": "other"}, "chosen": "onnx", "measurements": []})
    )
    assert choice.load_record(fields) is None


def test_the_table_shows_each_engine_and_explains_the_choice():
    record = {
        "fields": {
            "machine": {"cpu": "Some CPU", "isa": ["avx2", "fma"], "cores": 2, "threads": 2},
            "input": [8, 3, 300, 400],
            "versions": {"torch": "2.9", "onnx": "1.20", "openvino": "2026.4.1"},
        },
        "measured_at": "2026-01-01T00:00:00+00:00",
        "measurements": [
            {"engine": "torch", "images_per_s": 10.25, "setup_s": 0.5, "difference": 0.0, "agrees": True},
            {"engine": "onnx", "images_per_s": 27.3, "setup_s": 4.0, "difference": 2e-7, "agrees": True},
            {"engine": "openvino", "error": "RuntimeError: no", "agrees": False},
        ],
        "chosen": "onnx",
    }
    text = format_record(record)
    lines = text.splitlines()
    assert lines[0] == "machine: Some CPU; ISA: avx2 fma; 2 CPUs, 2 threads"
    assert "batch 8 at 300x400" in lines[1]
    assert lines[3].split()[:3] == ["PyTorch", "2.9", "10.25"]
    assert lines[4].split()[:4] == ["ONNX", "Runtime", "1.20", "27.30"] and lines[4].endswith("yes")
    assert lines[5].startswith("OpenVINO") and "failed: RuntimeError: no" in lines[5]
    assert lines[-1].startswith("chosen: ONNX Runtime")


@needs_onnx
def test_geoswc_info_prints_the_machine_and_the_measured_table(tiny_model_dir, capsys, cache):
    assert main(["info", "--model", str(tiny_model_dir), "--size", "48x64", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    record = json.loads(next((cache / "engines").glob("*.json")).read_text())
    assert "ISA:" in out and "measured now" in out
    assert format_record(record) in out
    assert main(["info", "--model", str(tiny_model_dir), "--size", "48x64", "--batch-size", "2"]) == 0
    assert "(stored)" in capsys.readouterr().out
    assert main(["info", "--model", str(tiny_model_dir), "--size", "48"]) == 2
    assert "--size '48' is not HEIGHTxWIDTH in pixels" in capsys.readouterr().err
