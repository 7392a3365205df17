"""Decode + resize throughput of geoswc's image path against plain Pillow, on MP16-like JPEGs.

MP16 photos as usually stored are ~500x375 JPEGs of ~40 KB. The script writes such photos (camera-like content:
smooth gradients, edges and sensor noise, quality 85) into a temporary folder, then times, single-threaded on the
same files, three pairs:

* decode + resize to a short side of ``--size`` (the data issue's measure):
  baseline ``PIL.Image.open(path).convert("RGB").resize(out, BILINEAR)``;
  ours ``resize_array(decode_array(path, target=size), out)`` (libjpeg-turbo at a SIMD DCT scale, OpenCV resize);
* the paper's training transform (random crop of 70-100 % of the area, aspect 3/4-4/3, flip, ``size`` square,
  normalised float tensor): baseline torchvision's ``RandomResizedCrop``/``RandomHorizontalFlip``/``ToTensor``/
  ``Normalize`` on a Pillow-decoded image; ours ``build_transform(train=True)`` on ``decode_array``;
* the paper's evaluation transform (longest side ``size``, normalised tensor), likewise.

It prints images per CPU-second (per core; wall time on a shared machine would measure the other jobs) and the
ratios. Usage: ``python benchmarks/bench_decode.py [--size 300] [--n 400]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from geoswc.data.images import decode_array, resize_array, short_side_size  # noqa: E402
from geoswc.data.transforms import build_transform  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_photos(folder: Path, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500] / 500.0
    paths = []
    for i in range(n):
        f = rng.uniform(2, 12, size=3)
        base = np.stack([np.sin(f[c] * xx + rng.uniform(0, 6) + f[(c + 1) % 3] * yy) for c in range(3)], -1)
        image = 120 + 90 * base + rng.normal(0, 9, size=base.shape)
        for _ in range(12):  # hard edges: buildings, signs
            y, x = rng.integers(0, 300), rng.integers(0, 420)
            image[y : y + rng.integers(10, 75), x : x + rng.integers(10, 80)] = rng.uniform(0, 255, size=3)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=85)
        paths.append(path)
    return paths


def throughput(func, paths, repeat: int = 3) -> float:
    """Images per second of CPU time of this (single-threaded) process: per-core speed even on a busy machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for path in paths:
            func(path)
        best = min(best, time.process_time() - start)
    return len(paths) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=300, help="output size (default 300)")
    parser.add_argument("--n", type=int, default=400, help="photos (default 400)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    size = args.size
    config = {"mean": MEAN, "std": STD, "interpolation": "bicubic"}
    pil_normalise = [T.ToTensor(), T.Normalize(MEAN, STD)]
    pil_train = T.Compose(
        [
            T.RandomResizedCrop(
                size, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
        ]
        + pil_normalise
    )
    pil_eval = T.Compose([ResizeLongestPIL(size)] + pil_normalise)
    our_train = build_transform(config, train=True, size=size)
    our_eval = build_transform(config, train=False, size=size, eval_resize="longest")
    out = short_side_size(500, 375, size)

    def pil_open(path):
        return Image.open(path).convert("RGB")

    pairs = {
        f"decode + resize to short side {size}": (
            lambda p: pil_open(p).resize(out, Image.Resampling.BILINEAR),
            lambda p: resize_array(decode_array(p, target=size), out),
        ),
        f"train transform ({size}x{size} crop, flip, tensor)": (
            lambda p: pil_train(pil_open(p)),
            lambda p: our_train(decode_array(p, target=size)),
        ),
        f"eval transform (longest side {size}, tensor)": (
            lambda p: pil_eval(pil_open(p)),
            lambda p: our_eval(decode_array(p, target=size, target_side="long")),
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.n)
        kb = np.mean([p.stat().st_size for p in paths]) / 1024
        print(f"{args.n} JPEGs 500x375, {kb:.0f} KB mean, 1 thread, images per CPU-second")
        print(f"{'':48s} {'Pillow':>8s} {'geoswc':>8s}  ratio")
        for name, (baseline, ours) in pairs.items():
            base, fast = throughput(baseline, paths), throughput(ours, paths)
            print(f"{name:48s} {base:8.0f} {fast:8.0f}  {fast / base:.2f}x")


class ResizeLongestPIL:
    """The evaluation resize done with Pillow's bicubic filter (the baseline)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        scale = self.size / max(image.size)
        new = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        return image.resize(new, Image.Resampling.BICUBIC)


if __name__ == "__main__":
    main()
