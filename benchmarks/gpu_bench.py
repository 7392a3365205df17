"""Every GPU measurement of geoswc in one run, printed as one JSON object (``benchmarks/gpu.sh``).

Sections, each timed after its own warm-up (compilation, cuDNN autotuning), each independent (a failing
section records its error and the others still run):

- ``train``: EfficientNet-B4 training images/s at 300 px (bfloat16 autocast, channels_last, ``torch.compile``,
  SGD on 1,000 classes), as ``geoswc train backbone`` runs it (`geoswc.train.engine.prepare_for_speed`);
- ``inference``: the same backbone's pooled-feature images/s in float16 and bfloat16 (channels_last, compiled);
- ``tag``: end-to-end `geoswc.tagging.run.tag_photos` images/s from JPEG files on disk (decoding workers sized to the
  cores, a B4 model folder with a CE head, the retrieval module and a background index, Search within Cell);
- ``swc``: Search within Cell queries/s (`geoswc.swc.search_within_cell`, K = 10) on a MP16-sized background of
  4.7M x 1792 float16 embeddings held on the GPU, in 26,406 cells;
- ``global``: exact global top-10 search queries/s over the same background: torch (float16 products and a
  running top-k) and FAISS-GPU (``GpuIndexFlatIP``, float16) when faiss with GPU support is installed;
- ``precision`` (with ``--model`` and ``--photos``): agreement of float16/bfloat16 with float32 on a trained
  model (``benchmarks/bench_precision.py``).

``--smoke`` runs every section on the CPU with tiny sizes (a dry run for CI, well under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

FULL = {
    "backbone": "efficientnet_b4",
    "size": 300,
    "train_batch": 128,
    "train_steps": 15,
    "infer_batch": 256,
    "infer_steps": 10,
    "tag_photos": 6144,
    "tag_batch": 256,
    "photo_size": (640, 480),
    "background": 4_700_000,
    "dim": 1792,
    "cells": 26_406,
    "queries": 16_384,
    "query_batch": 4096,
    "global_queries": 2048,
    "compile": True,
}
SMOKE = {
    "backbone": "test_efficientnet",
    "size": 32,
    "train_batch": 4,
    "train_steps": 2,
    "infer_batch": 4,
    "infer_steps": 2,
    "tag_photos": 12,
    "tag_batch": 4,
    "photo_size": (96, 72),
    "background": 20_000,
    "dim": 64,
    "cells": 50,
    "queries": 256,
    "query_batch": 128,
    "global_queries": 64,
    "compile": False,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - start


def half_dtype(device: torch.device, name: str) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def bench_train(cfg: dict, device: torch.device) -> dict:
    import timm

    from geoswc.precision import CompiledForward

    torch.manual_seed(0)
    model = timm.create_model(cfg["backbone"], pretrained=False, num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = CompiledForward(model) if cfg["compile"] else model
    x = torch.randn(cfg["train_batch"], 3, cfg["size"], cfg["size"], device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (cfg["train_batch"],), device=device)
    dtype = half_dtype(device, "bf16")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    warm = time.perf_counter()
    for _ in range(3):
        step()
    sync(device)
    warm = time.perf_counter() - warm
    seconds = timed(step, cfg["train_steps"], device)
    return {
        "images_per_s": cfg["train_batch"] * cfg["train_steps"] / seconds,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": cfg["train_batch"],
        "compiled": bool(cfg["compile"]) and getattr(forward, "failed", None) is None,
        "warmup_s": warm,
    }


def bench_inference(cfg: dict, device: torch.device) -> dict:
    import timm

    from geoswc.precision import CompiledForward

    torch.manual_seed(0)
    model = timm.create_model(cfg["backbone"], pretrained=False, num_classes=0).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    forward = CompiledForward(model) if cfg["compile"] else model
    x = torch.randn(cfg["infer_batch"], 3, cfg["size"], cfg["size"], device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    out = {"batch": cfg["infer_batch"]}
    for name in ("fp16", "bf16"):
        dtype = half_dtype(device, name)

        def step():
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            ):
                forward(x)

        warm = time.perf_counter()
        for _ in range(3):
            step()
        sync(device)
        warm = time.perf_counter() - warm
        seconds = timed(step, cfg["infer_steps"], device)
        out[name] = {
            "images_per_s": cfg["infer_batch"] * cfg["infer_steps"] / seconds,
            "dtype": str(dtype).replace("torch.", ""),
            "warmup_s": warm,
        }
    out["compiled"] = bool(cfg["compile"]) and getattr(forward, "failed", None) is None
    return out


def _write_photo(args) -> None:
    path, width, height, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
    pixels = np.clip(base * rng.uniform(0.4, 1.0, 3) + rng.normal(0, 14, (height, width, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


def make_photos(folder: Path, count: int, size, *, seed: int = 0) -> None:
    """JPEGs of two orientations (two transformed shapes, as in a real archive)."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    jobs = [
        (str(folder / f"p{i:06d}.jpg"), *((width, height) if i % 4 else (height, width)), seed + i)
        for i in range(count)
    ]
    with Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
        pool.map(_write_photo, jobs, chunksize=64)


def build_model_folder(cfg: dict, directory: Path, *, eval_resize: str = "longest") -> Path:
    """A model folder with every part: a random-weight backbone, a CE head on a partition of random points,
    the retrieval module and a background index of random embeddings."""
    from geoswc.classifiers import create_backbone, create_head
    from geoswc.config import Config
    from geoswc.geocells import S2Partitioner
    from geoswc.geolocator import Geolocator
    from geoswc.retrieval.index import BackgroundIndex
    from geoswc.retrieval.model import ResidualRetrievalModule

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    latlon = np.column_stack([rng.uniform(-60, 70, 20_000), rng.uniform(-180, 180, 20_000)])
    geocells = (
        S2Partitioner(min_images=20, max_images=(400, 200, 100)).fit(latlon[:, 0], latlon[:, 1]).geocells_
    )
    config = Config().merge(
        {
            "data": {"image_size": cfg["size"], "eval_resize": eval_resize},
            "backbone": {"model": cfg["backbone"], "pretrained": False},
        }
    )
    backbone = create_backbone(cfg["backbone"], pretrained=False).eval()
    dim = backbone.num_features
    head = create_head("ce", in_features=dim, geocells=geocells)
    retrieval = ResidualRetrievalModule(dim, hidden_dim=min(4096, 4 * dim)).eval()
    cells = geocells.fine.assign(latlon[:, 0], latlon[:, 1])
    keep = cells >= 0
    emb = torch.nn.functional.normalize(torch.randn(int(keep.sum()), dim), dim=1).numpy()
    index = BackgroundIndex().build(
        emb,
        cell_idx=cells[keep],
        latlon=latlon[keep],
        ids=[f"bg{i}" for i in np.flatnonzero(keep)],
        n_cells=len(geocells.fine),
        fingerprint=geocells.fingerprint,
    )
    model = Geolocator(
        backbone=backbone,
        geocells=geocells,
        heads={"ce": head},
        retrieval=retrieval,
        index=index,
        config=config,
        backbone_name=cfg["backbone"],
    )
    return model.save_pretrained(directory)


def bench_tag(cfg: dict, device: torch.device, tmp: Path) -> dict:
    from geoswc.geolocator import Geolocator
    from geoswc.precision import default_workers
    from geoswc.tagging.run import tag_photos

    start = time.perf_counter()
    make_photos(tmp / "warm", max(8, cfg["tag_batch"] * 2), cfg["photo_size"], seed=10_000_000)
    make_photos(tmp / "photos", cfg["tag_photos"], cfg["photo_size"])
    photos_s = time.perf_counter() - start
    model_dir = build_model_folder(cfg, tmp / "model")
    model = Geolocator.from_pretrained(
        model_dir, device=device, compile="on" if cfg["compile"] else "off"
    )  # precision auto: fp16 on CUDA, fp32 on CPU
    workers = default_workers(device)
    options = dict(model=model, batch_size=cfg["tag_batch"], workers=workers, overwrite=True)
    warm = time.perf_counter()
    tag_photos([str(tmp / "warm")], out=str(tmp / "warm.csv"), **options)
    warm = time.perf_counter() - warm
    start = time.perf_counter()
    summary = tag_photos([str(tmp / "photos")], out=str(tmp / "tags.csv"), **options)
    seconds = time.perf_counter() - start
    assert summary["ok"] == cfg["tag_photos"], summary
    return {
        "images_per_s": cfg["tag_photos"] / seconds,
        "photos": cfg["tag_photos"],
        "photo_size": list(cfg["photo_size"]),
        "workers": workers,
        "batch": cfg["tag_batch"],
        "dtype": str(model.compute_dtype).replace("torch.", ""),
        "compiled": model._backbone_forward is not None and model._backbone_forward.failed is None,
        "warmup_s": warm,
        "make_photos_s": photos_s,
    }


def background(cfg: dict, device: torch.device):
    """A `BackgroundIndex` of ``cfg['background']`` random unit float16 embeddings held on ``device`` (the host
    copy is a zero-stride view: the GPU search reads only the device copy), cells of skewed sizes."""
    from geoswc.retrieval.index import BackgroundIndex

    rng = np.random.default_rng(0)
    n, dim, n_cells = cfg["background"], cfg["dim"], cfg["cells"]
    sizes = rng.lognormal(mean=0.0, sigma=1.2, size=n_cells)
    counts = np.floor(sizes / sizes.sum() * n).astype(np.int64)
    counts[: n - counts.sum()] += 1
    index = BackgroundIndex()
    emb = torch.empty((n, dim), dtype=torch.float16, device=device)
    for start in range(0, n, 1 << 20):
        block = torch.randn(min(1 << 20, n - start), dim, device=device)
        emb[start : start + len(block)] = torch.nn.functional.normalize(block, dim=1).half()
    index.embeddings = np.broadcast_to(np.zeros(dim, np.float16), (n, dim))
    index.cell_idx = np.repeat(np.arange(n_cells), counts)
    index.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    index.latlon = np.column_stack([rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)])
    index.ids = np.arange(n).astype(str)
    index.fingerprint = "benchmark"
    index._device_embeddings[str(emb.device)] = emb
    return index, emb, counts


def bench_search(cfg: dict, device: torch.device) -> dict:
    from geoswc.swc import search_within_cell

    index, emb, counts = background(cfg, device)
    rng = np.random.default_rng(1)
    q = cfg["queries"]
    cells = rng.choice(len(counts), size=q, p=counts / counts.sum())
    queries = torch.nn.functional.normalize(torch.randn(q, cfg["dim"], device=device), dim=1)
    batch = cfg["query_batch"]
    search_within_cell(queries[:batch], cells[:batch], index, k=10)  # warm-up
    sync(device)
    start = time.perf_counter()
    for s in range(0, q, batch):
        res = search_within_cell(queries[s : s + batch], cells[s : s + batch], index, k=10, eps_km=1.0)
    sync(device)
    swc_s = time.perf_counter() - start
    out = {
        "swc": {
            "queries_per_s": q / swc_s,
            "queries": q,
            "k": 10,
            "found": float(np.mean(_numpy(res.found))),
        },
        "background": {"rows": int(len(emb)), "dim": int(emb.shape[1]), "cells": int(len(counts))},
    }

    gq = queries[: cfg["global_queries"]].half()

    def torch_flat(k: int = 10, chunk: int = 1 << 20):
        best_s = torch.full((len(gq), k), float("-inf"), device=device)
        best_i = torch.full((len(gq), k), -1, dtype=torch.long, device=device)
        for start in range(0, len(emb), chunk):
            sims = (gq @ emb[start : start + chunk].T).float()
            s, i = sims.topk(k, dim=1)
            merged_s = torch.cat([best_s, s], dim=1)
            merged_i = torch.cat([best_i, i + start], dim=1)
            best_s, pos = merged_s.topk(k, dim=1)
            best_i = merged_i.gather(1, pos)
        return best_s, best_i

    torch_flat()
    seconds = timed(torch_flat, 3, device)
    out["global_torch_flat"] = {
        "queries_per_s": 3 * len(gq) / seconds,
        "queries": len(gq),
        "dtype": "float16",
    }
    out["global_faiss_gpu"] = bench_faiss(emb, gq)
    return out


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def bench_faiss(emb: torch.Tensor, queries: torch.Tensor) -> dict:
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss is not installed (pip install faiss-gpu-cu12, or conda's faiss-gpu)"}
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return {"skipped": "faiss has no GPU support here"}
    res = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.useFloat16 = True
    index = faiss.GpuIndexFlatIP(res, emb.shape[1], config)
    for start in range(0, len(emb), 1 << 20):
        index.add(emb[start : start + (1 << 20)].float().cpu().numpy())
    q = queries.float().cpu().numpy()
    index.search(q[:64], 10)
    start = time.perf_counter()
    index.search(q, 10)
    seconds = time.perf_counter() - start
    return {"queries_per_s": len(q) / seconds, "queries": len(q), "dtype": "float16"}


def bench_precision(model: str, photos, device: torch.device) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_precision import agreement, photo_paths

    return agreement(
        model, photo_paths(photos, 0), ["fp16", "bf16"], head=None, batch_size=64, device=str(device)
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (a dry run)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["train", "inference", "tag", "search", "precision"],
        help="these sections",
    )
    parser.add_argument("--model", help="a trained model folder for the precision section")
    parser.add_argument("--photos", nargs="+", help="its photos")
    parser.add_argument("--out", help="also write the JSON here (after every section)")
    args = parser.parse_args()

    cfg = dict(SMOKE if args.smoke else FULL)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        parser.error("no CUDA device: run with --smoke for a dry run on the CPU")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "backbone": cfg["backbone"],
        "size": cfg["size"],
    }
    started = time.perf_counter()
    sections = ["train", "inference", "tag", "search"] + (["precision"] if args.model else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name in sections:
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            try:
                if name == "train":
                    result[name] = bench_train(cfg, device)
                elif name == "inference":
                    result[name] = bench_inference(cfg, device)
                elif name == "tag":
                    result[name] = bench_tag(cfg, device, Path(tmp))
                elif name == "search":
                    result[name] = bench_search(cfg, device)
                else:
                    result[name] = bench_precision(args.model, args.photos, device)
            except Exception as err:  # noqa: BLE001 - one section's failure must not lose the others
                result[name] = {
                    "error": f"{type(err).__name__}: {err}",
                    "trace": traceback.format_exc()[-2000:],
                }
            result[name]["seconds"] = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[gpu_bench] {name} done in {result[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    result["total_s"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if any(isinstance(v, dict) and "error" in v for v in result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
