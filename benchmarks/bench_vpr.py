"""Place recognition at scale: database search, database embedding and training speed, with baselines in the same run.

``search``: ``--n`` database descriptors of ``--dim`` dimensions (default 1M x 512, the size of a city's
database with GeM on a ResNet-50), searched by ``--queries`` queries through `geoswc.vpr.search` in every index
mode (``flat``, ``sq8``, ``pq``, ``bits``), against a bare ``faiss.IndexFlatIP`` over the same array (what the
field's ``test.py`` does, in inner-product form). Descriptors have place structure: a direction per place plus
noise, queries are other noisy views of random places, so the compact modes' recall@1 against exact search
means something. Prints build seconds, queries/s, recall@1 against flat and bytes per photo.

``embed``: database photos of a synthetic street world (`geoswc vpr synth`) embedded by
`geoswc.street.embed.Embedder` (batched, the path `vpr evaluate`, `vpr index` and the training cache refresh
use) against one photo at a time (the same decoder, resize, normalise, forward), images/s in the same run.

``train``: `geoswc vpr train` images/s (forward and backward of every photo of a step) for both losses on the
same world, the difference of a long and a short run so that setup and the first cache refresh cancel.

    python benchmarks/bench_vpr.py                          # everything, full scale
    python benchmarks/bench_vpr.py --parts search --n 200000 --queries 500    # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    """CPU model, its ISA flags, the CPU count and Python, in one line (`geoswc.engines.choice.machine`)."""
    from geoswc.engines.choice import machine as cpu

    box = cpu()
    return f"{box['cpu']}; ISA: {' '.join(box['isa']) or '-'}; {box['cores']} CPUs; Python {platform.python_version()}"


def place_descriptors(n: int, dim: int, n_places: int, rng: np.random.Generator, noise: float = 0.7):
    """``n`` L2-normalised descriptors of ``n_places`` places (written in chunks to keep the peak low)."""
    centres = rng.standard_normal((n_places, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    place = rng.integers(0, n_places, n)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 1 << 16):
        x = centres[place[s : s + (1 << 16)]]
        x = x + noise / np.sqrt(dim) * rng.standard_normal(x.shape, dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres, place


def bench_search(args) -> None:
    import faiss

    from geoswc.vpr.search import INDEX_MODES, bytes_per_photo, database_index, pq_options, search

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    db, centres, _ = place_descriptors(args.n, args.dim, max(1, args.n // 4), rng)
    chosen = rng.integers(0, len(centres), args.queries)
    q = centres[chosen] + 0.7 / np.sqrt(args.dim) * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32
    )
    queries = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    print(
        f"descriptors: {args.n:,} x {args.dim} ({db.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s"
    )

    t0 = time.perf_counter()
    raw = faiss.IndexFlatIP(args.dim)
    raw.add(db)
    raw_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, raw_rows = raw.search(queries, 1)
    raw_s = time.perf_counter() - t0
    rows = [("faiss IndexFlatIP (baseline)", raw_build, args.queries / raw_s, 100.0, 4.0 * args.dim)]

    index = database_index(db)
    del db
    opts = pq_options(args.n)
    for mode in INDEX_MODES:
        t0 = time.perf_counter()
        search(index, queries[:1], 1, mode, **opts)  # builds (trains) the index
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, found = search(index, queries, 1, mode, **opts)
        elapsed = time.perf_counter() - t0
        agree = 100.0 * float(np.mean(found[:, 0] == raw_rows[:, 0]))
        rows.append(
            (f"geoswc {mode}", build, args.queries / elapsed, agree, bytes_per_photo(mode, args.dim, **opts))
        )
    print("\n| index | build s | queries/s | top-1 as exact % | bytes/photo |\n|---|---:|---:|---:|---:|")
    for name, build, qps, agree, nbytes in rows:
        print(f"| {name} | {build:.1f} | {qps:,.0f} | {agree:.1f} | {nbytes:g} |")
    print(f"\nflat / bare faiss queries/s: {rows[1][2] / rows[0][2]:.2f}")


def _world(tmp: Path, seed: int) -> Path:
    from geoswc.data.synth_street import make_street_world

    root = tmp / "world"
    make_street_world(root, queries_per_street=24, seed=seed)
    return root


def bench_embed(args, root: Path) -> None:
    import torch
    from PIL import Image

    from geoswc.data.images import decode_array
    from geoswc.data.transforms import ToNormalizedTensor
    from geoswc.data.vpr import read_split
    from geoswc.street.embed import Embedder, photo_size
    from geoswc.street.model import off_the_shelf

    split = read_split(root, "test")
    paths = [split.folder / p for p in split.database[: args.photos]]
    size = photo_size(paths[0])
    loaded = off_the_shelf(preset="tiny", pool=args.pool)
    embedder = Embedder(loaded, size=size, batch_size=args.batch_size, progress=False)
    embedder.descriptors(paths[:4])  # warm-up
    t0 = time.perf_counter()
    batched = embedder.descriptors(paths)
    batched_s = time.perf_counter() - t0

    normalize = ToNormalizedTensor(loaded.data_config["mean"], loaded.data_config["std"])
    t0 = time.perf_counter()
    single = []
    with torch.no_grad():
        for path in paths:
            array = decode_array(path)
            if array.shape[:2] != size:
                array = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))
            single.append(loaded.net(normalize(array)[None]).numpy()[0])
    single_s = time.perf_counter() - t0
    diff = float(np.abs(np.stack(single) - batched).max())
    print(f"\nembedding {len(paths)} database photos ({size[1]}x{size[0]}, preset tiny, {args.pool}):")
    print("| path | images/s |\n|---|---:|")
    print(f"| one photo at a time | {len(paths) / single_s:.1f} |")
    print(f"| Embedder, batch {args.batch_size} | {len(paths) / batched_s:.1f} |")
    print(f"batched / one at a time: {single_s / batched_s:.2f}x (max |difference| {diff:.1e})")


def _train_seconds(root: Path, out: Path, settings, steps: int) -> float:
    from geoswc.street.model import off_the_shelf
    from geoswc.train.vpr import train_vpr

    loaded = off_the_shelf(preset="tiny", pool=settings.pool, clusters=settings.clusters)
    t0 = time.perf_counter()
    train_vpr(loaded, root, out, settings, cpu=True, max_steps=steps)
    return time.perf_counter() - t0


def bench_train(args, root: Path) -> None:
    """Images/s of `geoswc vpr train` steps (forward and backward of every photo of a step): the time of a run
    of ``2 + N`` steps minus that of a run of 2 (same setup, same first cache refresh), over N steps' photos."""
    from geoswc.train.vpr import VPRTrainSettings

    print(
        "\ntraining (preset tiny, one process; channels-last, the default, against the standard memory order):\n"
        "| pool | loss | photos a step | images/s, standard order | images/s, channels-last | ratio |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for loss in ("triplet", "batch-hard"):
            rates = []
            for channels_last in (False, True):
                settings = VPRTrainSettings(pool=args.pool, loss=loss, epochs=1, channels_last=channels_last)
                per_step = (
                    settings.batch_size * (2 + settings.negatives)
                    if loss == "triplet"
                    else settings.places * settings.photos_per_place
                )
                name = f"{loss}-{channels_last}"
                short = _train_seconds(root, Path(tmp) / f"{name}-short", settings, 2)
                long = _train_seconds(root, Path(tmp) / f"{name}-long", settings, 2 + args.train_steps)
                rates.append(args.train_steps * per_step / max(long - short, 1e-9))
            print(
                f"| {args.pool} | {loss} | {per_step} | {rates[0]:.1f} | {rates[1]:.1f} | "
                f"{rates[1] / rates[0]:.2f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts", nargs="+", default=["search", "embed", "train"], choices=["search", "embed", "train"]
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="database descriptors for the search part")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--photos", type=int, default=120, help="database photos for the embedding part")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pool", default="gem", choices=["gem", "netvlad"])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    if "search" in args.parts:
        bench_search(args)
    if {"embed", "train"} & set(args.parts):
        with tempfile.TemporaryDirectory() as tmp:
            root = _world(Path(tmp), args.seed)
            if "embed" in args.parts:
                bench_embed(args, root)
            if "train" in args.parts:
                bench_train(args, root)


if __name__ == "__main__":
    main()
