"""Input transforms with the paper's augmentation (ICMR 2021, section 4.2) and padded batching.

Training: random crop covering 70-100 % of the image with aspect ratio 3/4-4/3, horizontal flip, resized to
300 x 300. Evaluation: "resize the images so that the largest side is 300 pixels" (``eval_resize="longest"``),
or ``"fixed"``: short side to ``size`` and a centre crop, the usual timm evaluation, or ``"shortest"``: short side
to ``size`` and no crop (what the ICMR authors' released code does). Mean, std and
interpolation come from the backbone's timm data config (``timm.data.resolve_model_data_config(model)``).

The transforms work on ``(H, W, 3)`` uint8 arrays as `geoswc.data.images.decode_array` returns them (PIL images
are accepted too): cropping and flipping are array views, the one resize is OpenCV's, and the conversion to a
normalised float tensor is a single fused pass, so a photo costs about a millisecond of CPU from JPEG bytes to
tensor (``benchmarks/bench_decode.py``).

Longest-side images differ in shape, so `pad_collate` pads each one at the bottom/right to a fixed
``size x size`` canvas with zeros - the dataset mean after normalisation - so every batch has one shape (no
recompilation, cudnn autotuning once) and records each image's true ``(height, width)``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .images import flip_left_right, resize_array, short_side_size
from .validation import check_choice

EVAL_RESIZE_MODES = ("longest", "fixed", "shortest")
# ``data_config["resize_backend"]``: "opencv" (default) decodes JPEGs at reduced size and resizes with OpenCV;
# "pil" decodes at full size with Pillow and resizes with torchvision's antialiased PIL resize, the pixels of a
# plain torchvision evaluation transform (what a model trained with one, such as the ICMR authors', expects).
RESIZE_BACKENDS = ("opencv", "pil")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

ImageLike = Union[np.ndarray, Image.Image]


def as_array(image: ImageLike) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB array from an array of that form or any PIL image."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got {array.dtype} array of shape {array.shape}"
        )
    return array


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with aspect ratio (width / height) log-uniform in ``ratio``, then
    resize it to ``size x size`` (Inception-style; ten draws, then the largest central crop within ``ratio``)."""

    def __init__(
        self,
        size: int,
        *,
        scale: Tuple[float, float] = (0.7, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
    ):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")
        self.size, self.scale, self.ratio, self.interpolation = (
            size,
            tuple(scale),
            tuple(ratio),
            interpolation,
        )

    def params(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """``(top, left, crop_height, crop_width)`` drawn with torch's generator (seeded per DataLoader worker)."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)).item())
                left = int(torch.randint(0, width - w + 1, (1,)).item())
                return top, left, h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, max(1, int(round(width / self.ratio[0])))
        elif aspect > self.ratio[1]:
            w, h = max(1, int(round(height * self.ratio[1]))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: ImageLike) -> np.ndarray:
        array = as_array(image)
        top, left, h, w = self.params(*array.shape[:2])
        crop = array[top : top + h, left : left + w]
        return resize_array(crop, (self.size, self.size), interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: ImageLike) -> np.ndarray:
        array = as_array(image)
        if torch.rand(1).item() >= self.p:
            return array
        # OpenCV's flip copies with SIMD, 15x faster than materialising numpy's reversed view.
        return flip_left_right(array)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ResizeLongest:
    """Resize so the longest side equals ``size``, keeping the aspect ratio (upsamples small images too)."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: ImageLike) -> np.ndarray:
        array = as_array(image)
        height, width = array.shape[:2]
        scale = self.size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        return resize_array(array, new, interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"ResizeLongest(size={self.size})"


class ResizeShortest:
    """Resize so the short side equals ``size``, keeping the aspect ratio, without cropping; the long side is
    truncated as torchvision's ``Resize(size)`` does (the ICMR authors' inference transform)."""

    def __init__(self, size: int, interpolation: str = "bilinear"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: ImageLike) -> np.ndarray:
        array = as_array(image)
        height, width = array.shape[:2]
        short, long = min(height, width), max(height, width)
        new_long = max(1, int(self.size * long / short))
        new = (self.size, new_long) if width <= height else (new_long, self.size)
        return resize_array(array, new, interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"ResizeShortest(size={self.size})"


class ResizeCenterCrop:
    """Resize the short side to ``size`` (up or down), then cut the central ``size x size`` square."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: ImageLike) -> np.ndarray:
        array = as_array(image)
        width, height = short_side_size(array.shape[1], array.shape[0], self.size)
        array = resize_array(array, (width, height), interpolation=self.interpolation)
        top, left = int(round((height - self.size) / 2)), int(round((width - self.size) / 2))
        return array[top : top + self.size, left : left + self.size]

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(size={self.size})"


class ToNormalizedTensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)`` holding ``(pixel / 255 - mean) / std``, in one pass."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        if mean.shape != (3,) or std.shape != (3,) or bool((std <= 0).any()):
            raise ValueError(
                f"mean and std need 3 values each and std > 0; got mean={mean.tolist()}, std={std.tolist()}"
            )
        self.mean, self.std = mean.tolist(), std.tolist()
        self._scale = (1.0 / (255.0 * std)).float().view(3, 1, 1)
        self._shift = (mean / std).float().view(3, 1, 1)

    def __call__(self, image: ImageLike) -> torch.Tensor:
        array = np.ascontiguousarray(as_array(image))
        if not array.flags.writeable:  # arrays viewing a PIL image's buffer; torch wants writable memory
            array = array.copy()
        pixels = torch.from_numpy(array).permute(2, 0, 1)
        out = torch.empty(pixels.shape, dtype=torch.float32)
        out.copy_(pixels)
        return out.mul_(self._scale).sub_(self._shift)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


class ImageTransform(T.Compose):
    """The transform `build_transform` returns: steps applied in order, plus what a loader needs to know.

    Attributes:
        accepts_arrays: True: the input may be an ``(H, W, 3)`` uint8 array (`decode_array`), not only PIL.
        decode_target, decode_side: what to decode JPEGs at (``decode_array(..., target=decode_target,
            target_side=decode_side)``): no step needs more pixels than that; None: at full size.
        decoder: which decoder to read photos with (``decode_array(..., decoder=decoder)``).
    """

    accepts_arrays = True

    def __init__(
        self,
        transforms: List[Callable],
        *,
        decode_target: Optional[int],
        decode_side: str = "short",
        decoder: str = "auto",
    ):
        super().__init__(transforms)
        self.decode_target, self.decode_side, self.decoder = decode_target, decode_side, decoder


class PilResize:
    """Resize as torchvision does on a PIL image (antialiased), as ``Resize``/``CenterCrop`` steps: ``mode``
    ``"shortest"`` (short side to ``size``), ``"fixed"`` (then the central square) or ``"longest"``."""

    def __init__(self, size: int, mode: str, interpolation: str = "bilinear"):
        self.size, self.mode, self.interpolation = size, mode, interpolation
        self._method = T.InterpolationMode(interpolation)

    def __call__(self, image: ImageLike) -> Image.Image:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(as_array(image), "RGB")
        if self.mode == "longest":
            width, height = image.size
            scale = self.size / max(width, height)
            shape = [max(1, round(height * scale)), max(1, round(width * scale))]
        else:
            shape = [self.size]
        image = T.functional.resize(image, shape, interpolation=self._method, antialias=True)
        return T.functional.center_crop(image, [self.size, self.size]) if self.mode == "fixed" else image

    def __repr__(self) -> str:
        return f"PilResize(size={self.size}, mode={self.mode!r}, interpolation={self.interpolation!r})"


def build_transform(
    data_config: Mapping,
    *,
    train: bool,
    size: int = 300,
    eval_resize: str = "longest",
    crop_scale: Tuple[float, float] = (0.7, 1.0),
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> ImageTransform:
    """RGB image (``(H, W, 3)`` uint8 array or PIL) -> normalised ``(3, H, W)`` float tensor.

    Args:
        data_config: the backbone's timm data config; ``mean`` and ``std`` are required, ``interpolation``
            (``bilinear``/``bicubic``/``nearest``) is honoured, and ``resize_backend`` (`RESIZE_BACKENDS`) says
            how evaluation photos are decoded and resized: ``"pil"`` as a torchvision transform on a PIL image
            (full-size Pillow decode, antialiased PIL resize, ``ToTensor`` and ``Normalize``), slower and exact;
            ``"opencv"`` (default) the fast path. Training always uses the fast path.
        train: training augmentation (random resized crop + flip) instead of the evaluation resize.
        size: output side (training and ``fixed``) or longest side (``longest``).
        eval_resize: ``"longest"`` (paper), ``"fixed"`` or ``"shortest"`` (short side to ``size``, no crop).
        crop_scale: area fraction range of the training crop.
        crop_ratio: aspect ratio range of the training crop.
        hflip: probability of a horizontal flip.
    """
    check_choice("eval_resize", eval_resize, EVAL_RESIZE_MODES)
    if "mean" not in data_config or "std" not in data_config:
        raise ValueError(
            f"data_config needs 'mean' and 'std' (timm.data.resolve_model_data_config); got {dict(data_config)}"
        )
    interpolation = str(data_config.get("interpolation", "bicubic"))
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"
    backend = str(data_config.get("resize_backend", "opencv"))
    check_choice("data_config resize_backend", backend, RESIZE_BACKENDS)
    if backend == "pil" and not train:
        normalise_pil = T.Normalize(list(data_config["mean"]), list(data_config["std"]))
        steps = [PilResize(size, eval_resize, interpolation), T.ToTensor(), normalise_pil]
        return ImageTransform(steps, decode_target=None, decoder="pillow")
    if train:
        steps: List[Callable] = [
            RandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio, interpolation=interpolation)
        ]
        if hflip > 0:
            steps.append(RandomHorizontalFlip(hflip))
    elif eval_resize == "longest":
        steps = [ResizeLongest(size, interpolation)]
    elif eval_resize == "shortest":
        steps = [ResizeShortest(size, interpolation)]
    else:
        steps = [ResizeCenterCrop(size, interpolation)]
    side = "long" if not train and eval_resize == "longest" else "short"
    normalise = ToNormalizedTensor(data_config["mean"], data_config["std"])
    return ImageTransform(steps + [normalise], decode_target=size, decode_side=side)


def pad_to_canvas(
    images: Sequence[torch.Tensor], canvas: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
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
        out["labels"] = torch.tensor([list(s["labels"]) for s in samples], dtype=torch.int64).reshape(
            len(samples), -1
        )
    for key in samples[0]:
        if key not in out:
            out[key] = [s[key] for s in samples]
    return out
