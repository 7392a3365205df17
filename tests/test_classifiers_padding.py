"""Frozen "same" padding (`geoswc.classifiers.padding`): the two rules that split an odd padding, how a backbone
folder records the rule, and that the ONNX export pads as PyTorch does.

References: hand-computed paddings, timm's own per-input ``Conv2dSame`` (the TensorFlow rule at the size it
was frozen for), and, where installed, efficientnet_pytorch itself (the version the ICMR authors pin, 0.7.0).
"""

from __future__ import annotations

import json

import pytest
import timm
import torch

from geoswc.classifiers.backbone import load_backbone, save_backbone
from geoswc.classifiers.padding import (
    EFFICIENTNET_PYTORCH_070,
    PADDING_RULES,
    TENSORFLOW,
    freeze_same_padding,
    same_padding,
)


def _smooth(*shape: int) -> torch.Tensor:
    """Images varying smoothly over a few pixels, as photos do."""
    coarse = torch.randn(*shape[:2], max(shape[2] // 11, 2), max(shape[3] // 11, 2))
    return torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)


def _tiny_b0() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=0).eval()
    # BatchNorm statistics of the model's own activations on such images, so that a one-pixel shift is not
    # washed out as it is with the default statistics of a random network
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(_smooth(8, 3, 66, 90))
    return model.eval()


def test_rules_split_an_odd_padding_differently():
    # B4's stem at 380 px: total (190 - 1) * 2 + 3 - 380 = 1
    assert same_padding(380, 3, 2, 1) == (0, 1)
    assert same_padding(380, 3, 2, 1, rule=EFFICIENTNET_PYTORCH_070) == (1, 1)
    # a 5x5 stride-2 convolution over 95 pixels: total 47 * 2 + 5 - 95 = 4, even, the same for both
    assert same_padding(95, 5, 2, 1) == same_padding(95, 5, 2, 1, rule=EFFICIENTNET_PYTORCH_070) == (2, 2)
    # 300 px, 5x5, stride 2: total 3
    assert same_padding(300, 5, 2, 1) == (1, 2)
    assert same_padding(300, 5, 2, 1, rule=EFFICIENTNET_PYTORCH_070) == (2, 2)
    with pytest.raises(ValueError, match="choose one of: tensorflow, efficientnet_pytorch==0.7.0"):
        same_padding(300, 5, 2, 1, rule="tf")
    with pytest.raises(ValueError, match="unknown padding rule"):
        freeze_same_padding(_tiny_b0(), (64, 64), rule="0.7.1")


def test_tensorflow_rule_at_its_own_size_is_timms_per_input_padding():
    model = _tiny_b0()
    x = _smooth(2, 3, 66, 90)
    with torch.no_grad():
        dynamic = model(x)
        frozen = freeze_same_padding(model, (66, 90))(x)
    assert torch.equal(frozen, dynamic)
    assert model.static_same_padding_rule == TENSORFLOW


def _frozen(rule: str) -> torch.nn.Module:
    model = _tiny_b0()
    return freeze_same_padding(model, (224, 224), rule=rule)


def test_backbone_folder_records_the_rule_and_old_folders_keep_theirs(tmp_path):
    x = _smooth(1, 3, 66, 90)
    outputs = {}
    for rule in PADDING_RULES:
        model = _frozen(rule)
        folder = save_backbone(model, tmp_path / rule, name="tf_efficientnet_b0", fingerprint="f")
        spec = json.loads((folder / "backbone.json").read_text())
        assert spec["static_same_padding"] == [224, 224] and spec["static_same_padding_rule"] == rule
        loaded = load_backbone(folder)[0].eval()
        with torch.no_grad():
            outputs[rule] = model(x)
            assert torch.equal(loaded(x), outputs[rule])
    # the two rules compute other features: the check below can tell them apart
    assert (outputs[TENSORFLOW] - outputs[EFFICIENTNET_PYTORCH_070]).abs().max() > 1e-3
    # a folder written before the rule was recorded loads with the rule it had then (TensorFlow's)
    folder = tmp_path / EFFICIENTNET_PYTORCH_070
    spec = json.loads((folder / "backbone.json").read_text())
    del spec["static_same_padding_rule"]
    (folder / "backbone.json").write_text(json.dumps(spec))
    loaded = load_backbone(folder)[0].eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), outputs[TENSORFLOW])
    spec["static_same_padding_rule"] = "efficientnet_pytorch==0.7.1"
    (folder / "backbone.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"backbone.json: unknown padding rule .*choose one of"):
        load_backbone(folder)


@pytest.mark.slow
@pytest.mark.parametrize("rule", sorted(PADDING_RULES))
def test_onnx_export_pads_as_pytorch(rule):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from geoswc.runtime import OnnxForward, has_input_dependent_padding

    model = _frozen(rule)
    assert not has_input_dependent_padding(model)
    forward = OnnxForward(model)
    with torch.no_grad():
        for shape in ((2, 3, 66, 90), (1, 3, 75, 64)):
            x = _smooth(*shape)
            reference = model(x)
            # float32 rounding, on features that the two rules change by most of their largest value
            scale = float(reference.abs().max())
            torch.testing.assert_close(forward(x), reference, atol=1e-5 * scale, rtol=0)
    assert forward.failed is None and forward.exports == [None]


def test_efficientnet_pytorch_070_rule_is_that_versions_padding():
    """B0 through efficientnet_pytorch 0.7.0 itself: its static padding at 224 px is the 0.7.0 rule."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    if efficientnet_pytorch.__version__ != "0.7.0":
        pytest.skip(f"efficientnet_pytorch {efficientnet_pytorch.__version__} is installed, not 0.7.0")
    from efficientnet_pytorch.utils import Conv2dStaticSamePadding

    theirs = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", include_top=False)
    pads = [
        tuple(m.static_padding.padding)
        for m in theirs.modules()
        if isinstance(m, Conv2dStaticSamePadding) and m.stride[0] == 2
    ]
    ours = [
        m.static_pad
        for m in _frozen(EFFICIENTNET_PYTORCH_070).modules()
        if hasattr(m, "static_pad") and m.stride[0] == 2
    ]
    assert pads == ours and pads[0] == (1, 1, 1, 1)
