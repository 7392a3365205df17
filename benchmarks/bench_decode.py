"""Decode + resize throughput of `decode_image` against plain Pillow, on MP16-like JPEGs.

MP16 photos as usually stored are ~500x375 JPEGs of ~40 KB. The script writes such photos (camera-like content:
smooth gradients, edges and sensor noise, quality 85) into a temporary folder, then times, single-threaded on the
same files:

* baseline: ``PIL.Image.open(path).convert("RGB").resize(out)``
* ours: ``decode_image(path, target=size)`` (libjpeg-turbo DCT scaling) + ``resize_short_side`` to ``size``

and prints images per CPU-second (per core; wall time on a shared machine would measure the other jobs) and
the ratio. Usage: ``python benchmarks/bench_decode.py [--size 300] [--n 400]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from geoswc.data.images import decode_image, resize_short_side


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
    parser.add_argument("--size", type=int, default=300, help="output short side (default 300)")
    parser.add_argument("--n", type=int, default=400, help="photos (default 400)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.n)
        kb = np.mean([p.stat().st_size for p in paths]) / 1024

        def ours(path):
            return resize_short_side(decode_image(path, target=args.size), args.size)

        out = ours(paths[0]).size  # DCT scaling may round the long side one pixel differently

        def baseline(path):
            return Image.open(path).convert("RGB").resize(out)

        base, fast = throughput(baseline, paths), throughput(ours, paths)
    print(f"{args.n} JPEGs 500x375, {kb:.0f} KB mean, output short side {args.size}, 1 thread")
    print(f"PIL open().convert().resize(): {base:8.0f} img/s per core")
    print(f"decode_image + resize:         {fast:8.0f} img/s per core")
    print(f"ratio: {fast / base:.2f}x")


if __name__ == "__main__":
    main()
