"""The backbone's runtime (`geoswc.runtime`, ``--runtime``): ONNX Runtime on the CPU computes the features
PyTorch computes (so a tag run places every photo where the PyTorch path does), picks one graph for every input
size or one per size for networks whose padding depends on the size, and never breaks a run: a graph that
disagrees with PyTorch, or one that cannot be exported, hands the backbone back to PyTorch."""

import logging

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from geoswc import runtime
from geoswc.geolocator import Geolocator
from geoswc.runtime import OnnxForward, check_runtime, has_input_dependent_padding, resolve_runtime
from geoswc.tagging.run import tag_photos
from geoswc.tagging.output import read_rows

pytestmark = pytest.mark.skipif(
    bool(runtime.missing_onnx_packages()),
    reason=f"runtime onnx needs {', '.join(runtime.missing_onnx_packages())}",
)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_auto_measures_only_for_an_uncompiled_float32_cpu_backbone():
    assert resolve_runtime("auto", "cpu", torch.float32) == "auto"
    assert resolve_runtime("auto", "cpu", torch.bfloat16) == "torch"
    assert resolve_runtime("auto", "cpu", torch.float32, compiled=True) == "torch"
    assert resolve_runtime("auto", torch.device("cuda", 0), torch.float32) == "torch"
    assert resolve_runtime("auto", "cuda", torch.float16) == "torch"
    assert resolve_runtime("torch", "cpu", torch.float32) == "torch"
    assert resolve_runtime("onnx", "cpu", torch.float32) == "onnx"


@pytest.mark.parametrize(
    "device, dtype, compiled, message",
    [
        ("cuda", torch.float32, False, "runs the backbone on the CPU, but the model is on cuda"),
        ("cpu", torch.float16, False, "runs in float32, but the precision mode asks for float16"),
        ("cpu", torch.float32, True, "compile 'on' exclude each other"),
    ],
)
def test_onnx_where_it_cannot_run_says_what_to_change(device, dtype, compiled, message):
    with pytest.raises(ValueError, match=message):
        resolve_runtime("onnx", device, dtype, compiled=compiled)


def test_unknown_runtime_and_missing_packages(monkeypatch):
    with pytest.raises(
        ValueError, match=r"unknown runtime 'tensorrt'; choose one of: auto, torch, onnx, openvino"
    ):
        check_runtime("tensorrt")
    monkeypatch.setattr(runtime, "missing_onnx_packages", lambda: ("onnxruntime",))
    monkeypatch.setattr(runtime, "missing_packages", lambda name: runtime.missing_onnx_packages())
    assert resolve_runtime("auto", "cpu", torch.float32) == "torch"
    with pytest.raises(ValueError, match="needs the package\\(s\\) onnxruntime: pip install onnxruntime"):
        resolve_runtime("onnx", "cpu", torch.float32)


def test_one_graph_serves_every_size_of_a_statically_padded_backbone():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    assert not has_input_dependent_padding(model)
    forward = OnnxForward(model)
    with torch.inference_mode():
        for shape in [(3, 3, 64, 80), (1, 3, 80, 64), (5, 3, 64, 80)]:
            pixels = torch.randn(shape)
            assert relative_difference(forward(pixels), model(pixels)) < 1e-5
    assert forward.exports == [None] and forward.failed is None


def test_tensorflow_same_padding_gets_one_graph_per_size():
    # timm's tf_ models pad their strided convolutions by amounts computed from each input's size.
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    assert has_input_dependent_padding(model)
    forward = OnnxForward(model)
    with torch.inference_mode():
        for shape in [(2, 3, 65, 81), (2, 3, 81, 65), (1, 3, 65, 81)]:
            pixels = torch.randn(shape)
            assert relative_difference(forward(pixels), model(pixels)) < 1e-5
    assert forward.exports == [(65, 81), (81, 65)] and forward.failed is None


class SizeDependentPad(nn.Module):
    """Pads by an amount computed in Python (an ``int``) from the input's width, which tracing fixes for one
    size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        x = F.pad(x, (0, int(x.shape[-1]) % 5, 0, 0))
        return self.conv(x).mean(dim=(2, 3))


def test_a_graph_that_disagrees_with_pytorch_is_replaced_by_one_per_size(caplog):
    torch.manual_seed(0)
    model = SizeDependentPad().eval()
    assert not has_input_dependent_padding(model)  # the layer names do not reveal it
    forward = OnnxForward(model)
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="geoswc.runtime"):
        first, second = torch.randn(2, 3, 16, 21), torch.randn(2, 3, 16, 23)
        assert relative_difference(forward(first), model(first)) < 1e-5
        # A graph exported at width 21 pads 1 column where width 23 needs 3: the check sees it.
        assert relative_difference(forward(second), model(second)) < 1e-5
    assert forward.exports == [None, (16, 23)] and forward.per_size and forward.failed is None
    assert "differ from PyTorch's" in caplog.text


class ConvSame(SizeDependentPad):
    """Named like timm's size-dependent "same" layers."""


def test_sizes_beyond_the_graph_limit_run_in_pytorch(monkeypatch):
    monkeypatch.setattr(runtime, "MAX_GRAPHS", 2)
    torch.manual_seed(0)
    model = nn.Sequential(ConvSame()).eval()
    assert has_input_dependent_padding(model)
    forward = OnnxForward(model)
    with torch.inference_mode():
        for width in (21, 23, 24, 21):
            pixels = torch.randn(2, 3, 16, width)
            assert relative_difference(forward(pixels), model(pixels)) < 1e-5
    assert forward.exports == [(16, 21), (16, 23)] and forward.failed is None


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        features = self.conv(x).mean(dim=(2, 3))
        return torch.from_numpy(np.sort(features.detach().numpy(), axis=1))  # leaves the traced graph


def test_a_backbone_that_cannot_be_exported_runs_in_pytorch_with_one_warning(caplog):
    model = Unexportable().eval()
    forward = OnnxForward(model)
    pixels = torch.randn(2, 3, 8, 8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="geoswc.runtime"):
        for _ in range(3):
            assert torch.equal(forward(pixels), model(pixels))
    assert forward.failed is not None
    assert caplog.text.count("running it in PyTorch") == 1


def test_tag_rows_under_onnx_equal_the_pytorch_rows(tiny_model_dir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        size = (64, 48) if i % 3 else (40, 72)  # landscape and portrait: two input sizes
        tint = rng.uniform(0, 255, 3)
        pixels = np.clip(tint + rng.normal(scale=40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i:02d}.jpg", quality=95)
    rows = {}
    for name in ("torch", "onnx"):
        model = Geolocator.from_pretrained(tiny_model_dir, device="cpu", runtime=name)
        assert model.runtime == name
        out = tmp_path / f"{name}.csv"
        summary = tag_photos([str(folder)], model=model, out=str(out), workers=0, batch_size=4)
        assert summary["ok"] == 12
        rows[name] = read_rows(str(out), "csv")
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert a["path"] == b["path"] and a["cell_token"] == b["cell_token"]
        assert abs(float(a["lat"]) - float(b["lat"])) < 1e-6
        assert abs(float(a["lon"]) - float(b["lon"])) < 1e-6
        assert abs(float(a["confidence"]) - float(b["confidence"])) < 1e-5
