"""Input transforms with the paper's augmentation (ICMR 2021, section 4.2) and padded batching.

Training: random crop covering 70-100 % of the image with aspect ratio 3/4-4/3, horizontal flip, resized to
300 x 300. Evaluation: "resize the images so that the largest side is 300 pixels" (``eval_resize="longest"``),
or ``"fixed"``: short side to ``size`` and a centre crop, the usual timm evaluation. Mean, std and
interpolation come from the backbone's timm data config (``timm.data.resolve_model_data_config(model)``).

Longest-side images differ in shape, so `pad_collate` pads each one at the bottom/right to a fixed
``size x size`` canvas with zeros - the dataset mean after normalisation - so every batch has one shape (no
recompilation, cudnn autotuning once) and records each image's true ``(height, width)``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision import transforms as T

EVAL_RESIZE_MODES = ("longest", "fixed")
_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


class ResizeLongest:
    """Resize so the longest side equals ``size``, keeping the aspect ratio (upsamples small images too)."""

    def __init__(self, size: int, interpolation: Image.Resampling = Image.Resampling.BICUBIC):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        return image if new == image.size else image.resize(new, self.interpolation)

    def __repr__(self) -> str:
        return f"ResizeLongest(size={self.size})"


def build_transform(
    data_config: Mapping,
    *,
    train: bool,
    size: int = 300,
    eval_resize: str = "longest",
    crop_scale: Tuple[float, float] = (0.7, 1.0),
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised ``(3, H, W)`` float tensor.

    Args:
        data_config: the backbone's timm data config; ``mean`` and ``std`` are required, ``interpolation``
            (``bilinear``/``bicubic``) is honoured.
        train: training augmentation (random resized crop + flip) instead of the evaluation resize.
        size: output side (training and ``fixed``) or longest side (``longest``).
        eval_resize: ``"longest"`` (paper) or ``"fixed"``.
        crop_scale: area fraction range of the training crop.
        crop_ratio: aspect ratio range of the training crop.
        hflip: probability of a horizontal flip.
    """
    if eval_resize not in EVAL_RESIZE_MODES:
        raise ValueError(f"unknown eval_resize {eval_resize!r}; choose one of: {', '.join(EVAL_RESIZE_MODES)}")
    if "mean" not in data_config or "std" not in data_config:
        raise ValueError(f"data_config needs 'mean' and 'std' (timm.data.resolve_model_data_config); got {dict(data_config)}")
    interpolation = _INTERPOLATION.get(str(data_config.get("interpolation", "bicubic")), T.InterpolationMode.BICUBIC)
    normalise = [T.ToTensor(), T.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"]))]
    if train:
        steps = [T.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=tuple(crop_ratio), interpolation=interpolation)]
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
    elif eval_resize == "longest":
        pil = Image.Resampling.BICUBIC if interpolation == T.InterpolationMode.BICUBIC else Image.Resampling.BILINEAR
        steps = [ResizeLongest(size, pil)]
    else:
        steps = [T.Resize(size, interpolation=interpolation), T.CenterCrop(size)]
    return T.Compose(steps + normalise)


def pad_to_canvas(images: Sequence[torch.Tensor], canvas: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(3, h, w)`` tensors into ``(B, 3, H, W)``, each at the top-left of a zero canvas.

    Returns:
        The batch and ``(B, 2)`` int64 true sizes ``(h, w)``.
    """
    height, width = canvas
    batch = torch.zeros((len(images), 3, height, width), dtype=images[0].dtype if images else torch.float32)
    sizes = torch.zeros((len(images), 2), dtype=torch.int64)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        if h > height or w > width:
            raise ValueError(f"image {i} of size {h}x{w} does not fit the {height}x{width} canvas")
        batch[i, :, :h, :w] = image
        sizes[i, 0], sizes[i, 1] = h, w
    return batch, sizes


def pad_collate(samples: List[Dict], canvas: Optional[int] = None) -> Dict[str, object]:
    """Collate dict samples: ``image`` stacked (padded to ``canvas x canvas``, or to the largest image when
    ``canvas`` is None, only if shapes differ), ``image_size`` ``(B, 2)``, ``latlon`` float64, ``labels``
    int64, other keys as lists.

    A sample whose ``image`` is None (a photo that failed to decode) gets an all-zero image; its ``error``
    string says why.
    """
    present = [s["image"] for s in samples if s.get("image") is not None]
    if present:
        shapes = {tuple(t.shape[-2:]) for t in present}
        if canvas is not None:
            frame = (canvas, canvas)
        else:
            frame = (max(h for h, _ in shapes), max(w for _, w in shapes))
    else:
        frame = (canvas or 1, canvas or 1)
    filler = torch.zeros((3, 1, 1))
    images = [s["image"] if s.get("image") is not None else filler for s in samples]
    batch, sizes = pad_to_canvas(images, frame)
    for i, s in enumerate(samples):
        if s.get("image") is None:
            sizes[i] = 0
    out: Dict[str, object] = {"image": batch, "image_size": sizes}
    out["latlon"] = torch.tensor([s["latlon"] for s in samples], dtype=torch.float64).reshape(len(samples), 2)
    if "labels" in samples[0]:
        out["labels"] = torch.tensor([list(s["labels"]) for s in samples], dtype=torch.int64).reshape(len(samples), -1)
    for key in samples[0]:
        if key not in out:
            out[key] = [s[key] for s in samples]
    return out
