"""Load on ``geoswc serve``: a bounded burst of photo uploads, dynamic batching against one photo at a time.

The script saves a model folder (``--backbone``, random weights, ``--image-size`` px; or takes ``--model DIR``),
starts the real command, ``geoswc serve --model DIR --host 127.0.0.1``, twice in a subprocess: with dynamic
batching (``--max-batch 32 --batch-wait-ms 5``) and one photo per forward pass (``--max-batch 1
--batch-wait-ms 0``). Against each it sends ``--requests`` POST /v1/locate requests (one 640x480 JPEG each),
``--concurrency`` at a time, from 127.0.0.1 only, and reports throughput and p50/p99 latency. Every request
must come back 200 with an ``ok`` row: any error or lost request fails the run (exit status 1).

Usage: ``python benchmarks/bench_serve.py [--requests 500] [--concurrency 16] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def build_model(folder: Path, *, backbone: str, image_size: int, n_background: int = 2000) -> Path:
    """A model folder with every part: a random-weight timm backbone, a partition of points around cities,
    the CE/HC/MvMF heads, a retrieval module and a background index of random embeddings."""
    import torch

    from geoswc.classifiers import create_backbone, create_head
    from geoswc.config import Config
    from geoswc.geocells import S2Partitioner
    from geoswc.geolocator import Geolocator
    from geoswc.retrieval.index import BackgroundIndex
    from geoswc.retrieval.model import ResidualRetrievalModule

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    hubs = np.array([[48.86, 2.35], [40.71, -74.0], [35.68, 139.69], [-33.87, 151.21], [51.51, -0.13]])
    latlon = hubs[rng.integers(0, len(hubs), n_background)] + rng.normal(scale=0.3, size=(n_background, 2))
    geocells = (
        S2Partitioner(min_images=10, max_images=(400, 200, 80)).fit(latlon[:, 0], latlon[:, 1]).geocells_
    )
    config = Config().merge(
        {
            "data": {"image_size": image_size, "eval_resize": "longest", "num_workers": 0},
            "backbone": {"model": backbone, "pretrained": False},
            "retrieval": {"hidden_dim": 256},
        }
    )
    net = create_backbone(backbone, pretrained=False).eval()
    dim = net.num_features
    heads = {kind: create_head(kind, in_features=dim, geocells=geocells) for kind in ("ce", "hc", "mvmf")}
    retrieval = ResidualRetrievalModule(dim, hidden_dim=256).eval()
    model = Geolocator(
        backbone=net,
        geocells=geocells,
        heads=heads,
        retrieval=retrieval,
        config=config,
        backbone_name=backbone,
    )
    cell_idx = geocells.fine.assign(latlon[:, 0], latlon[:, 1])
    keep = cell_idx >= 0
    embeddings = rng.normal(size=(int(keep.sum()), dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    model.index = BackgroundIndex().build(
        embeddings,
        cell_idx=cell_idx[keep],
        latlon=latlon[keep],
        ids=[f"bg{i:05d}.jpg" for i in np.flatnonzero(keep)],
        n_cells=len(geocells.fine),
        fingerprint=geocells.fingerprint,
    )
    return model.save_pretrained(folder)


def photos(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 255, size=(3,))
        pixels = np.clip(base + rng.normal(scale=50, size=(480, 640, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, port: int, *, max_batch: int, wait_ms: float, device: str):
    command = [
        sys.executable,
        "-m",
        "geoswc",
        "serve",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--batch-wait-ms",
        str(wait_ms),
        "--device",
        device,
        "--offline",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"geoswc serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()["status"] == "ok":
                return proc
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("geoswc serve did not start within 300 s")


async def burst(url: str, images: list, n_requests: int, concurrency: int) -> dict:
    import httpx

    latencies, failures = [], []
    queue = list(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        # Warm-up, not timed: the first forward pass of every batch size the burst can produce (on a GPU each
        # new size costs a one-time kernel selection), through bursts of 1, 2, 4 ... concurrent requests.
        width = 1
        while width <= 2 * concurrency:
            await asyncio.gather(
                *(
                    client.post(
                        "/v1/locate", files={"file": ("w.jpg", images[i % len(images)], "image/jpeg")}
                    )
                    for i in range(width)
                )
            )
            width *= 2
        before = (await client.get("/healthz")).json()["batching"]

        async def worker():
            while queue:
                i = queue.pop()
                started = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/locate", files={"file": (f"{i}.jpg", images[i % len(images)], "image/jpeg")}
                    )
                    ok = r.status_code == 200 and r.json()["results"][0]["status"] == "ok"
                except httpx.HTTPError as err:
                    ok, r = False, err
                latencies.append(time.perf_counter() - started)
                if not ok:
                    failures.append((i, getattr(r, "status_code", None) or repr(r)))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = (await client.get("/healthz")).json()["batching"]
    ms = np.asarray(latencies) * 1000.0
    batches = after["batches"] - before["batches"]
    items = after["items"] - before["items"]
    return {
        "requests": n_requests,
        "answered": len(latencies),
        "errors": len(failures),
        "failures": failures[:5],
        "wall_s": wall,
        "throughput_rps": n_requests / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "forward_batches": batches,
        "mean_batch": items / max(batches, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: build one with --backbone)")
    parser.add_argument(
        "--backbone", default="tf_efficientnet_lite0", help="timm backbone of the built model"
    )
    parser.add_argument("--image-size", type=int, default=224, help="input size of the built model (px)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(
            Path(tmp) / "model", backbone=args.backbone, image_size=args.image_size
        )
        images = photos(32)
        results = {}
        for name, max_batch, wait_ms in (("dynamic batching", 32, 5.0), ("one at a time", 1, 0.0)):
            port = free_port()
            proc = start_server(model_dir, port, max_batch=max_batch, wait_ms=wait_ms, device=args.device)
            try:
                results[name] = asyncio.run(
                    burst(f"http://127.0.0.1:{port}", images, args.requests, args.concurrency)
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    print(
        f"geoswc serve under load: {args.requests} requests, {args.concurrency} concurrent, 127.0.0.1, "
        f"device {args.device}, model {args.model or f'{args.backbone} at {args.image_size} px'}; {machine}"
    )
    print(
        f"{'serving':<18} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'answered':>8} {'mean batch':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<18} {r['throughput_rps']:>7.1f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['errors']:>6} "
            f"{r['answered']:>8} {r['mean_batch']:>10.1f}"
        )
    base, ours = results["one at a time"], results["dynamic batching"]
    print(
        f"throughput ratio (batching / one at a time): {ours['throughput_rps'] / base['throughput_rps']:.2f}x"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "args": vars(args) | {"model": str(args.model), "json": str(args.json)},
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    bad = [n for n, r in results.items() if r["errors"] or r["answered"] != args.requests]
    if bad:
        print(
            f"FAILED: errors or lost requests with {', '.join(bad)}: {[results[n]['failures'] for n in bad]}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
