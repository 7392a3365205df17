"""Training and feature-extraction throughput (images/s) of a timm backbone on this machine.

Variants, measured in the same run so the ratios are meaningful on a noisy machine: eager NCHW (the baseline),
channels_last, and ``torch.compile`` (when it works here). Training = forward + CE over ``--classes`` cells +
backward + SGD step; extraction = pooled features under ``no_grad`` in eval mode.

    python benchmarks/bench_train.py --model tf_efficientnet_lite0 --size 64 --batch 32 --steps 5
"""

from __future__ import annotations

import argparse
import time

import torch

from geoswc.classifiers import create_backbone


def measure(fn, steps: int, batch: int) -> float:
    fn()  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * batch / (time.perf_counter() - start)


def variant(model_name: str, *, channels_last: bool, compiled: bool, size: int, batch: int, classes: int):
    torch.manual_seed(0)
    backbone = create_backbone(model_name)
    head = torch.nn.Linear(backbone.num_features, classes)
    model = torch.nn.Sequential(backbone, head)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    labels = torch.randint(0, classes, (batch,))
    forward_train = torch.compile(model) if compiled else model
    forward_feat = torch.compile(backbone) if compiled else backbone
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def train_step():
        model.train()
        loss = torch.nn.functional.cross_entropy(forward_train(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def extract_step():
        backbone.eval()
        forward_feat(images)

    return train_step, extract_step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    print(
        f"{args.model} at {args.size}px, batch {args.batch}, {args.steps} steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device cpu"
    )
    variants = [("eager", False, False), ("channels_last", True, False)]
    if not args.no_compile:
        variants.append(("compiled+channels_last", True, True))
    base = None
    print(f"{'variant':<24}{'train img/s':>12}{'ratio':>8}{'extract img/s':>15}{'ratio':>8}")
    for name, cl, comp in variants:
        try:
            train_step, extract_step = variant(
                args.model,
                channels_last=cl,
                compiled=comp,
                size=args.size,
                batch=args.batch,
                classes=args.classes,
            )
            train = measure(train_step, args.steps, args.batch)
            extract = measure(extract_step, args.steps, args.batch)
        except Exception as err:  # torch.compile needs a working C++ toolchain; report instead of failing
            print(f"{name:<24}unavailable: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
            continue
        base = base or (train, extract)
        print(f"{name:<24}{train:>12.1f}{train / base[0]:>8.2f}{extract:>15.1f}{extract / base[1]:>8.2f}")


if __name__ == "__main__":
    main()
