"""Reduced-precision inference against the exact fp32 path, on a fixed set of photos (`geoswc.precision`).

For each precision mode (and ``onnx``: float32 in ONNX Runtime, `geoswc.runtime`), the same photos go through `Geolocator.predict` (Search within Cell) and are compared
with ``fp32``: the share of photos whose top-1 cell is the same (rule: >= 99.5 %), the share whose coordinates
are within 1 km (rule: >= 99 %), and images/s of the backbone alone in each mode. Run it on a trained model
(the demo's) for agreement, and on EfficientNet-B4 at 300 px (``--backbone``, random weights, features only)
for speed:

    python benchmarks/bench_precision.py --model geoswc-demo/model --photos geoswc-demo/world/images --limit 300
    python benchmarks/bench_precision.py --backbone efficientnet_b4 --size 300 --batches 3

Prints one JSON object (``--json``) or a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

TOP1_RULE, KM1_RULE = 0.995, 0.99


def haversine_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from geoswc.eval import haversine_km as distance

    return np.asarray(distance(a[:, 0], a[:, 1], b[:, 0], b[:, 1]))


def photo_paths(folders, limit: int):
    from geoswc.data.images import discover

    paths = sorted(photo.path for photo in discover([str(f) for f in folders]).photos)
    return paths[:limit] if limit else paths


def agreement(model_dir: str, paths, modes, *, head, batch_size: int, device: str) -> dict:
    """Each mode's predictions against fp32's on ``paths``, and the backbone's images/s per mode."""
    from geoswc.geolocator import Geolocator

    result = {"photos": len(paths), "modes": {}}
    reference = None
    for mode in ["fp32", *[m for m in modes if m != "fp32"]]:
        model = Geolocator.from_pretrained(
            model_dir,
            device=device,
            precision_mode="fp32" if mode == "onnx" else mode,
            compile="off",
            runtime="onnx" if mode == "onnx" else "torch",
        )
        start = time.perf_counter()
        records = model.predict(paths, head=head, mode="swc", batch_size=batch_size)
        seconds = time.perf_counter() - start
        cells = np.array([r["cell_idx"] for r in records])
        latlon = np.array([[r["lat"], r["lon"]] for r in records])
        entry = {
            "dtype": str(model.compute_dtype).replace("torch.", ""),
            "images_per_s": len(paths) / seconds,
            "distinct_cells": int(len(set(cells.tolist()))),
        }
        if reference is None:
            reference = cells, latlon
        else:
            km = haversine_km(reference[1], latlon)
            entry["top1_same"] = float(np.mean(reference[0] == cells))
            entry["within_1km"] = float(np.mean(km <= 1.0))
            entry["max_km"] = float(km.max())
            entry["rule_ok"] = entry["top1_same"] >= TOP1_RULE and entry["within_1km"] >= KM1_RULE
        result["modes"][mode] = entry
    return result


def backbone_speed(name: str, size: int, modes, *, batch_size: int, batches: int, device: str) -> dict:
    """Images/s of a random-weight timm backbone at ``size`` px per mode (channels_last, as the Geolocator)."""
    import timm

    from geoswc.precision import autocast, resolve_dtype

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval().to(device)
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    out = {"backbone": name, "size": size, "batch": batch_size, "modes": {}}
    reference = None
    for mode in ["fp32", *[m for m in modes if m not in ("fp32", "onnx")]]:
        dtype = resolve_dtype(mode, device)
        layouts = [("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)]
        for layout, fmt in layouts if mode == "fp32" else layouts[1:]:
            model = model.to(memory_format=fmt)
            x = pixels.contiguous(memory_format=fmt)
            with torch.inference_mode(), autocast(torch.device(device), dtype):
                features = model(x).float()  # warm-up
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(batches):
                    model(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            entry = {
                "dtype": str(dtype).replace("torch.", ""),
                "images_per_s": batch_size * batches / seconds,
            }
            if reference is None:
                reference = features
            else:
                entry["feature_rel_error"] = float(
                    torch.linalg.norm(features - reference) / torch.linalg.norm(reference)
                )
            out["modes"][f"{mode} {layout}"] = entry
    if "onnx" in modes and device == "cpu":
        from geoswc.runtime import OnnxForward

        forward = OnnxForward(model.to(memory_format=torch.contiguous_format))
        with torch.inference_mode():
            features = forward(pixels)  # warm-up: exports the graph
            start = time.perf_counter()
            for _ in range(batches):
                forward(pixels)
        seconds = time.perf_counter() - start
        out["modes"]["fp32 onnxruntime"] = {
            "dtype": "float32",
            "images_per_s": batch_size * batches / seconds,
            "feature_rel_error": float(
                torch.linalg.norm(features - reference) / torch.linalg.norm(reference)
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a model folder (agreement and speed of the whole Geolocator)")
    parser.add_argument("--photos", nargs="+", type=Path, help="photo folders/files for --model")
    parser.add_argument("--limit", type=int, default=0, help="the first N photos (sorted by path); 0 = all")
    parser.add_argument("--head", default=None)
    parser.add_argument("--backbone", help="a timm backbone for speed alone (random weights)")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["bf16", "fp16", "onnx"],
        help="modes compared with fp32 (onnx: fp32 in ONNX Runtime, CPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not args.model and not args.backbone:
        parser.error("give --model (with --photos) and/or --backbone")

    from geoswc.precision import cpu_has_native_bf16

    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "native_bf16_cpu": cpu_has_native_bf16(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    }
    if args.model:
        if not args.photos:
            parser.error("--model needs --photos")
        paths = photo_paths(args.photos, args.limit)
        report["agreement"] = agreement(
            args.model, paths, args.modes, head=args.head, batch_size=args.batch_size, device=args.device
        )
    if args.backbone:
        report["speed"] = backbone_speed(
            args.backbone,
            args.size,
            args.modes,
            batch_size=args.batch_size,
            batches=args.batches,
            device=args.device,
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(json.dumps(report["machine"]))
    if "agreement" in report:
        print(f"agreement with fp32 on {report['agreement']['photos']} photos ({args.model}):")
        for mode, e in report["agreement"]["modes"].items():
            extra = ""
            if "top1_same" in e:
                extra = (
                    f"  top-1 cell same {100 * e['top1_same']:.1f} %  within 1 km {100 * e['within_1km']:.1f} %"
                    f"  max {e['max_km']:.2f} km  rule {'met' if e['rule_ok'] else 'NOT met'}"
                )
            print(
                f"  {mode:5s} {e['dtype']:9s} {e['images_per_s']:8.1f} img/s  {e['distinct_cells']} cells{extra}"
            )
    if "speed" in report:
        s = report["speed"]
        print(f"{s['backbone']} at {s['size']} px, batch {s['batch']}:")
        for mode, e in s["modes"].items():
            err = f"  feature error {e['feature_rel_error']:.2e}" if "feature_rel_error" in e else ""
            print(f"  {mode:22s} {e['images_per_s']:8.1f} img/s{err}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
