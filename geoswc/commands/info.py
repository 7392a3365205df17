"""`geoswc info [--model DIR]`: this machine's CPU, the engines installed and, for a model folder, each engine's
speed on the model's input and what ``--runtime auto`` runs it in (`geoswc.engines.choice`)."""

from __future__ import annotations

import argparse


def _size(text: str):
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or int(height) < 1 or int(width) < 1:
        raise ValueError(f"--size {text!r} is not HEIGHTxWIDTH in pixels (for example 300x400)")
    return int(height), int(width)


def machine_lines():
    from geoswc.engines.choice import ENGINE_NAMES, available_engines, engine_versions, machine
    from geoswc.data.files import cache_dir

    box = machine()
    versions = engine_versions()
    lines = [
        f"CPU: {box['cpu']}",
        f"ISA: {' '.join(box['isa']) or '-'}",
        f"CPUs: {box['cores']}, PyTorch threads: {box['threads']}",
        "engines: "
        + ", ".join(
            f"{ENGINE_NAMES[name]} {versions[name]}"
            + ("" if name in available_engines() else " (not usable)")
            for name in ENGINE_NAMES
            if versions[name]
        ),
    ]
    if "openvino" in available_engines():
        from geoswc.engines import openvino

        bf16 = "yes" if openvino.native_bf16() else "no"
        lines.append(f"OpenVINO CPU capabilities: {' '.join(openvino.capabilities())}; native bf16: {bf16}")
    lines.append(f"cache: {cache_dir()}")
    return lines


def run(args: argparse.Namespace) -> int:
    for line in machine_lines():
        print(line)
    if args.model is None:
        return 0
    import torch

    from geoswc.engines import agreement
    from geoswc.engines.choice import choice_for, format_record
    from geoswc.geolocator import Geolocator
    from geoswc.precision import default_batch_size

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = Geolocator.from_pretrained(args.model, device="cpu", runtime="torch")
    height, width = _size(args.size) if args.size else tuple(model.data_config["input_size"][1:])
    batch = args.batch_size or default_batch_size("cpu")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, height, width, generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    record, decisions = agreement.folder_decisions(args.model, model.backbone)
    reduced = {d.engine: d.factory for d in decisions if d.admitted}
    print(f"\n{agreement.format_record(record, decisions)}")
    record, _, stored = choice_for(model.backbone, pixels, remeasure=args.remeasure, reduced=reduced)
    print(
        f"\nbackbone {model.backbone_name or '?'} of {args.model} ({'stored' if stored else 'measured now'}):"
    )
    print(format_record(record))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="this machine's CPU and engines; with --model, each engine's speed on the model and what auto picks",
        description="Print the CPU (model, ISA extensions), the installed engines and the cache folder. With "
        "--model: time PyTorch, ONNX Runtime and OpenVINO on the model's backbone, check each against PyTorch, "
        "and print the table --runtime auto chooses from (stored per machine and model; --remeasure measures "
        "again).",
    )
    parser.add_argument("--model", metavar="DIR", help="model folder (Geolocator.save_pretrained)")
    parser.add_argument("--size", metavar="HxW", help="input size (default: the model's own, e.g. 300x400)")
    parser.add_argument("--batch-size", type=int, default=None, help="photos per pass (default: 8 on a CPU)")
    parser.add_argument("--remeasure", action="store_true", help="measure again instead of reading the cache")
    parser.set_defaults(func=run)
