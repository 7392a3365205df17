import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from geoswc.classifiers import (
    create_backbone,
    lite0_weights_path,
    load_backbone,
    load_backbone_weights,
    save_backbone,
)
from geoswc.classifiers.backbone import read_state_dict


def test_backbone_returns_pooled_features():
    model = create_backbone("tf_efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, model.num_features) == (2, 1280)


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="unknown timm model 'efficientnet_b44'"):
        create_backbone("efficientnet_b44")


def test_safetensors_with_classifier_loads_without_it(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_backbone("resnet10t", weights=tmp_path / "w.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key])


def test_offline_lite0_weights_load_by_tensor_order():
    path = lite0_weights_path()
    assert path.suffix == ".pth" and path.is_file()
    model = create_backbone("tf_efficientnet_lite0", weights=path)
    # The package's tensors (other key names, same order) end up in timm's slots, the classifier dropped.
    file_tensors = [v for k, v in read_state_dict(path).items() if not k.startswith("_fc.")]
    for (key, value), expected in zip(model.state_dict().items(), file_tensors):
        torch.testing.assert_close(value, expected, msg=key)
    # Real ImageNet statistics: BatchNorm running variances are not the init value 1.
    assert not torch.allclose(model.bn2.running_var, torch.ones_like(model.bn2.running_var))


def test_mismatched_weights_raise_clearly():
    with pytest.raises(ValueError, match="does not fit the model"):
        create_backbone("resnet10t", weights=lite0_weights_path())


def test_missing_or_unsupported_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone weights file not found"):
        create_backbone("resnet10t", weights=tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="choose one of: .safetensors, .pth"):
        load_backbone_weights(timm.create_model("resnet10t", num_classes=0), tmp_path / "w.npz")


class _Config:
    def to_dict(self):
        return {"backbone": {"model": "test_efficientnet"}, "seed": 3}


def _trained_backbone():
    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet", pretrained=False)
    # Non-default BatchNorm statistics, so a load that skipped buffers would show.
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(4, 3, 64, 64))
    return backbone.eval()


def test_backbone_folder_round_trip(tmp_path):
    backbone = _trained_backbone()
    folder = save_backbone(
        backbone, tmp_path / "bb", name="test_efficientnet", fingerprint="abc123", config=_Config()
    )
    assert folder == tmp_path / "bb"
    spec = json.loads((folder / "backbone.json").read_text())
    assert spec == {
        "model": "test_efficientnet",
        "num_features": 256,
        "data_config": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in timm.data.resolve_model_data_config(backbone).items()
        },
    }
    with safe_open(str(folder / "backbone.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["kind"], meta["model"], meta["fingerprint"]) == ("backbone", "test_efficientnet", "abc123")
    assert json.loads(meta["config"]) == _Config().to_dict()

    loaded, info = load_backbone(folder, expected_fingerprint="abc123")
    assert info["model"] == "test_efficientnet" and info["num_features"] == 256
    assert info["fingerprint"] == "abc123" and info["config"] == _Config().to_dict()
    assert info["data_config"] == spec["data_config"]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), backbone(images), rtol=0, atol=0)


def test_backbone_folder_takes_a_config_dict_or_none(tmp_path):
    backbone = _trained_backbone()
    save_backbone(backbone, tmp_path / "a", name="test_efficientnet", fingerprint="f", config={"seed": 1})
    assert load_backbone(tmp_path / "a")[1]["config"] == {"seed": 1}
    save_backbone(backbone, tmp_path / "b", name="test_efficientnet", fingerprint="f")
    assert load_backbone(tmp_path / "b")[1]["config"] is None


def test_backbone_folder_missing_file_names_folder_file_and_command(tmp_path):
    save_backbone(_trained_backbone(), tmp_path / "bb", name="test_efficientnet", fingerprint="f")
    (tmp_path / "bb" / "backbone.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"bb has no backbone.safetensors.*geoswc train backbone"):
        load_backbone(tmp_path / "bb")
    with pytest.raises(FileNotFoundError, match=r"nowhere has no backbone.json.*geoswc train backbone"):
        load_backbone(tmp_path / "nowhere")


def test_backbone_folder_of_another_partition_is_refused(tmp_path):
    save_backbone(_trained_backbone(), tmp_path / "bb", name="test_efficientnet", fingerprint="cells-a")
    with pytest.raises(ValueError, match=r"partition 'cells-a' but the expected fingerprint is 'cells-b'"):
        load_backbone(tmp_path / "bb", expected_fingerprint="cells-b")
