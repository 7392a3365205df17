"""int8 against float32 in ONNX Runtime on the CPU (`geoswc.engines.quantize`): images/s of the backbone alone,
timed in interleaved rounds in one run (the best round of each counts), and how far its features move.

    python benchmarks/bench_int8.py --backbone efficientnet_b4 --size 300x400 --batch 1
    python benchmarks/bench_int8.py --model MODEL --photos PHOTOS   # plus agreement (geoswc precision check)

With ``--backbone`` the weights are random and the calibration pixels are noise: the speed is the network's,
the feature error says nothing about a trained model's predictions. With ``--model`` the calibration and the
comparison use the photos (agreement as the model folder's record computes it; nothing is written).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def _size(text: str):
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def timed(forwards, pixels, *, rounds: int, seconds: float):
    """The best seconds per call of each forward, over interleaved rounds."""
    best = {name: float("inf") for name in forwards}
    started, done = time.perf_counter(), 0
    with torch.inference_mode():
        for forward in forwards.values():
            forward(pixels)  # export, quantise or read the caches, first-photo check
        while done < rounds or time.perf_counter() - started < seconds:
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward(pixels)
                best[name] = min(best[name], time.perf_counter() - start)
            done += 1
    return best, done


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", help="a timm backbone, random weights (speed only)")
    parser.add_argument(
        "--model", help="a model folder (speed on its input size, and agreement with --photos)"
    )
    parser.add_argument("--photos", nargs="+", help="photos for calibration and agreement (with --model)")
    parser.add_argument("--size", default="300x400", help="HxW (--backbone; --model: the model's own)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--schemes", nargs="+", default=["int8", "int8-edges", "int8-mixed"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if bool(args.backbone) == bool(args.model):
        parser.error("give --backbone or --model")
    if args.model and not args.photos:
        parser.error("--model needs --photos (calibration and agreement)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from geoswc.engines import agreement, quantize
    from geoswc.runtime import OnnxForward

    report = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    torch.manual_seed(0)
    if args.backbone:
        import timm

        module = timm.create_model(args.backbone, pretrained=False, num_classes=0).eval()
        height, width = _size(args.size)
        calibration = [torch.randn(2, 3, height, width).numpy() for _ in range(4)]
    else:
        from geoswc.geolocator import Geolocator

        model = Geolocator.from_pretrained(args.model, device="cpu", precision_mode="fp32", runtime="torch")
        module = model.backbone
        paths = agreement.split_photos(sorted(_photos(args.photos)), photos=0, calibration=32)[0]
        calibration = list(agreement._calibration_batches(model, paths, 8, None))
        height, width = calibration[0].shape[2:]
        record = agreement.measure_precisions(
            model, _photos(args.photos), precisions=["int8"], schemes=args.schemes, all_schemes=True
        )
        report["agreement"] = record["precisions"]["int8"]["tried"]
    pixels = torch.randn(args.batch, 3, height, width)
    fp32 = OnnxForward(module)
    graph = fp32._graph(pixels[:1], dynamic_size=not fp32.per_size)
    forwards = {"fp32": fp32}
    for scheme in args.schemes:
        start = time.perf_counter()
        _, ranges = quantize.calibrate(graph, iter(calibration), scheme)
        report[f"calibrate {scheme} s"] = round(time.perf_counter() - start, 1)
        forwards[scheme] = quantize.QuantizedForward(module, ranges, scheme)
    best, rounds = timed(forwards, pixels, rounds=args.rounds, seconds=args.seconds)
    with torch.inference_mode():
        reference = module(pixels)
        errors = {
            name: float(torch.linalg.vector_norm(f(pixels) - reference) / torch.linalg.vector_norm(reference))
            for name, f in forwards.items()
        }
    report["input"] = [args.batch, 3, int(height), int(width)]
    report["rounds"] = rounds
    report["images_per_s"] = {name: round(args.batch / s, 2) for name, s in best.items()}
    report["ratio_to_fp32"] = {name: round(best["fp32"] / s, 2) for name, s in best.items()}
    report["feature_relative_l2"] = {name: float(f"{e:.3g}") for name, e in errors.items()}
    report["failed"] = {name: f.failed for name, f in forwards.items() if f.failed}
    print(json.dumps(report, indent=1))


def _photos(inputs):
    from geoswc.data.discovery import discover

    return sorted(photo.path for photo in discover(list(inputs or [])).photos)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
