import pytest
import timm
import torch
from safetensors.torch import save_file

from geoswc.classifiers import create_backbone, load_backbone_weights, lite0_weights_path
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
