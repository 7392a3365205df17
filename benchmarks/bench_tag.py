"""What `geoswc tag`'s pipeline (discovery, decoding, transform, writing) adds to the backbone's forward time.

Both timings run in this process over the same JPEGs and the same batches:

- backbone: the forward passes alone, on tensors decoded and transformed beforehand;
- end to end: `geoswc.tagging.run.tag_photos` over the folder (decoding workers, reduced-size JPEG decoding, the
  eval transform, batched model calls, rows flushed per batch).

The overhead is ``end_to_end / backbone - 1``; the target is <= 10 % on CPU.

    python benchmarks/bench_tag.py --photos 128 --backbone efficientnet_b4 --size 300
    python benchmarks/bench_tag.py --model DIR          # a real model folder (Geolocator)

``--authors``: end-to-end ``geoswc tag`` (a B4 model folder at 300 px with every part, the default precision
mode, decoding workers) against the ICMR authors' own inference path, written out here as their released
``inference.py`` runs it: PIL decode, torchvision ``Resize(300)`` + ``ToTensor`` + ``Normalize``, one photo at a
time, eager NCHW float32. Both resize the short side to 300 px (the model folder uses ``eval_resize:
shortest``), so both feed the network the same number of pixels; same photos, same run.

    python benchmarks/bench_tag.py --authors --photos 24
    python benchmarks/bench_tag.py --authors --photos 24 --runtime torch   # PyTorch instead of ONNX Runtime
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class BackbonePredictor:
    """A randomly initialised timm backbone with geoswc's eval transform (short side to ``size``, centre
    square: one tensor shape, as timm evaluates); features become a position."""

    def __init__(self, name: str, size: int):
        import timm
        from timm.data import resolve_model_data_config

        from geoswc.data.transforms import build_transform

        self.model = timm.create_model(name, pretrained=False, num_classes=0).eval()
        config = resolve_model_data_config(self.model)
        self.transform = build_transform(config, train=False, size=size, eval_resize="fixed")

    @torch.inference_mode()
    def forward(self, pixels):
        return self.model(pixels)

    def predict_batch(self, pixels):
        features = self.forward(pixels)
        # A deterministic position from the features, so every row carries real numbers.
        lat = torch.tanh(features[:, 0]) * 90
        lon = torch.tanh(features[:, 1]) * 180
        return [
            {
                "lat": a,
                "lon": b,
                "method": "cell",
                "cell_token": None,
                "cell_probability": None,
                "confidence": None,
            }
            for a, b in zip(lat.tolist(), lon.tolist())
        ]


def make_photos(folder: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """Camera-like JPEGs: smooth gradients plus noise, quality 90, EXIF-free."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
        noise = rng.normal(0, 12, size=(height, width, 3))
        pixels = np.clip(base * rng.uniform(0.5, 1.0, 3) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo_{i:05d}.jpg", quality=90)


def fp32_peak_gflops(isa, cores: int) -> tuple:
    """The CPU's float32 peak, ``cores x GHz x FLOP a cycle`` (two FMA units of the widest vector ISA: 32 FLOP a
    cycle with AVX2, 64 with AVX-512), with the clock the kernel reports now (base or boost: an estimate)."""
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":", 1)[1]))
    except (OSError, ValueError):
        pass
    per_cycle = 64 if "avx512f" in isa else 32 if "avx2" in isa else 8
    return cores * mhz / 1000 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"


def gflop_per_photo(model, shape) -> float:
    """Forward GFLOP of one photo of ``shape`` (C, H, W), counted by `torch.utils.flop_counter`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros((1, *shape)))
    return counter.get_total_flops() / 1e9


def engine_table(model, shape) -> list:
    """Images/s of the backbone alone in every installed engine at batch 1 (``geoswc.engines.choice``)."""
    from geoswc.engines.choice import available_engines, measure

    try:
        measurements, _ = measure(model, torch.randn(1, *shape), available_engines())
        return [m for m in measurements if m.error is None]
    except Exception as err:  # a missing or failing engine leaves the end-to-end figures standing
        print(f"engine measurement failed: {err}")
        return []


def authors_vs_geoswc(args) -> None:
    """Images/s of the authors' path and of ``geoswc tag`` on the same JPEGs, and their ratio."""
    import sys

    import timm
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms as T

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_bench import build_model_folder

    from geoswc.geolocator import Geolocator
    from geoswc.precision import default_workers
    from geoswc.tagging.run import tag_photos

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        make_photos(folder, args.photos, args.width, args.height)
        paths = sorted(str(p) for p in folder.iterdir())
        cfg = {"backbone": args.backbone, "size": args.size}
        model_dir = build_model_folder(cfg, Path(tmp) / "model", eval_resize="shortest")

        authors = timm.create_model(args.backbone, pretrained=False, num_classes=0).eval()
        authors.load_state_dict(load_file(str(model_dir / "backbone.safetensors")))
        transform = T.Compose(
            [
                T.Resize(args.size),
                T.ToTensor(),
                T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        )

        def authors_run():
            with torch.no_grad():
                for path in paths:
                    authors(transform(Image.open(path).convert("RGB")).unsqueeze(0))

        model = Geolocator.from_pretrained(
            model_dir, device="cpu", compile=args.compile, runtime=args.runtime
        )
        options = dict(model=model, batch_size=args.batch_size, workers=args.workers, overwrite=True)
        tag_photos(paths[:2], out=str(Path(tmp) / "warm.csv"), **options)  # warm-up (and compile, if on)
        authors_s, geoswc_s = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            authors_run()
            authors_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            summary = tag_photos([str(folder)], out=str(Path(tmp) / f"tags{repeat}.csv"), **options)
            geoswc_s.append(time.perf_counter() - start)
            assert summary["ok"] == args.photos, summary
        dtype = str(model.compute_dtype).replace("torch.", "")
        runtime = model.runtime
        shape = tuple(transform(Image.open(paths[0]).convert("RGB")).shape)
        gflop = gflop_per_photo(authors, shape)
        engines = engine_table(authors, shape)
    from geoswc.engines.choice import machine

    workers = args.workers if args.workers is not None else default_workers("cpu")
    a, g = args.photos / min(authors_s), args.photos / min(geoswc_s)
    host = machine()
    peak, peak_how = fp32_peak_gflops(host["isa"], host["cores"])
    print(
        f"machine: {host['cpu']}, {host['cores']} CPUs ({' '.join(host['isa']) or 'no AVX2'}), torch threads "
        f"{torch.get_num_threads()}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )
    print(
        f"fp32 peak about {peak:.0f} GFLOP/s ({peak_how}); {gflop:.2f} GFLOP a photo at {shape[1]}x{shape[2]}"
    )
    for m in engines:
        print(
            f"  backbone alone, batch 1, {m.engine} fp32: {m.images_per_s:.2f} images/s, "
            f"{m.images_per_s * gflop:.0f} GFLOP/s ({100 * m.images_per_s * gflop / peak:.0f} % of peak)"
        )
    print(f"{args.backbone} at {args.size} px (short side), {args.photos} JPEGs {args.width}x{args.height}")
    print(f"authors' path (PIL, batch 1, eager NCHW fp32):     {a:.2f} images/s, {a * gflop:.0f} GFLOP/s")
    print(
        f"geoswc tag (batch {args.batch_size}, {workers} workers, {dtype}, runtime {runtime}, "
        f"compile {args.compile}): {g:.2f} images/s, {g * gflop:.0f} GFLOP/s "
        f"({100 * g * gflop / peak:.0f} % of peak)"
    )
    print(f"ratio: {g / a:.2f}x (goal on CPU >= 8x)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=128)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument("--backbone", default="efficientnet_b4")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--model", help="a model folder; overrides --backbone/--size")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: geoswc's with --authors, else 32"
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="alternating timings of each; the best counts")
    parser.add_argument(
        "--authors", action="store_true", help="geoswc tag against the authors' inference path"
    )
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="with --authors")
    parser.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "torch", "onnx", "openvino"],
        help="with --authors (geoswc.runtime)",
    )
    args = parser.parse_args()
    if args.authors:
        if args.batch_size is None:
            from geoswc.precision import default_batch_size

            args.batch_size = default_batch_size("cpu")
        authors_vs_geoswc(args)
        return
    args.batch_size = args.batch_size or 32

    from geoswc.data.images import load_photo
    from geoswc.tagging.run import resize_target, tag_photos

    if args.model:
        from geoswc.geolocator import Geolocator

        predictor = Geolocator.from_pretrained(args.model)
        forward = predictor.predict_batch
        label = f"model {args.model}"
    else:
        predictor = BackbonePredictor(args.backbone, args.size)
        forward = predictor.forward
        label = f"{args.backbone} at {args.size} px (random weights)"
    target = resize_target(predictor.transform)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        make_photos(folder, args.photos, args.width, args.height)
        paths = sorted(str(p) for p in folder.iterdir())
        pixels = torch.stack(
            [predictor.transform(load_photo(p, target=target, as_array=True)) for p in paths]
        )
        batches = list(torch.split(pixels, args.batch_size))
        forward(batches[0][:2])  # warm-up: allocator, kernels

        backbone_s, e2e_s = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            for batch in batches:
                forward(batch)
            backbone_s.append(time.perf_counter() - start)

            out = Path(tmp) / f"tags{repeat}.csv"
            start = time.perf_counter()
            summary = tag_photos(
                [str(folder)],
                model=predictor,
                out=str(out),
                batch_size=args.batch_size,
                workers=args.workers,
                target=target,
            )
            e2e_s.append(time.perf_counter() - start)
            assert summary["ok"] == args.photos, summary

    backbone, e2e = min(backbone_s), min(e2e_s)
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )
    print(
        f"{label}; {args.photos} JPEGs {args.width}x{args.height}; batch {args.batch_size}; {workers} decoding workers"
    )
    print(f"backbone forward on preloaded tensors: {backbone:.2f} s ({args.photos / backbone:.1f} images/s)")
    print(f"end-to-end geoswc tag:                 {e2e:.2f} s ({args.photos / e2e:.1f} images/s)")
    print(f"pipeline overhead: {100 * (e2e / backbone - 1):+.1f} % (target <= 10 %)")


if __name__ == "__main__":
    main()
