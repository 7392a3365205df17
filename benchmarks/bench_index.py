"""Search within Cell at MP16 scale: BackgroundIndex.search_cells against FAISS baselines measured in the same run.

Background: ``--n`` vectors (default 4.7M) spread over cells like the ICMR authors' placeable background
(``../shared/reference/cells/visloc_background_per_cell.csv``, 763,265 photos over 26,406 cells, scaled up; a
lognormal with the same median and maximum when the file is absent). Embeddings have cell structure (a
direction per cell plus noise, L2-normalised) and are stored as float16, D = ``--dim`` (128 by default:
4.7M x 128 x 2 B = 1.2 GB; the paper's D = 1792 would be 16.8 GB, more than this machine's spare RAM).

Prints queries/s of batched search within the predicted cell, of FAISS ``IDSelectorBatch`` filtered search
(a flat index restricted to the cell's ids) and of exact global search, and the ratios; then recall@10 and bytes
per photo of the compact global-search modes against exact search on a ``--recall-n`` subset.

    python benchmarks/bench_index.py                       # full scale
    python benchmarks/bench_index.py --n 200000 --queries 2000   # quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from geoswc.retrieval.index import BackgroundIndex, recall_at_k

REFERENCE = "reference/cells/visloc_background_per_cell.csv"


def cell_sizes(n: int, shared: Path, rng: np.random.Generator) -> tuple:
    path = shared / REFERENCE
    if path.is_file():
        counts = np.loadtxt(path, delimiter=",", skiprows=1, usecols=1).astype(np.float64)
        source = f"{path.name} scaled x{n / counts.sum():.2f}"
    else:
        # Same median (15) and maximum (451) as the reference, 26,406 cells.
        counts = np.minimum(rng.lognormal(np.log(15), 1.0, 26406), 451)
        source = "lognormal(median 15, max 451) fallback"
    sizes = np.floor(counts * n / counts.sum()).astype(np.int64)
    sizes[np.argsort(-counts)[: n - sizes.sum()]] += 1
    return sizes, source


def make_embeddings(path: Path, sizes: np.ndarray, dim: int, seed: int, chunk_cells: int = 2000):
    """Cell-sorted float16 embeddings written chunk by chunk; returns (memmap, cell_idx, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    n = int(sizes.sum())
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    cell_idx = np.repeat(np.arange(len(sizes)), sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for c0 in range(0, len(sizes), chunk_cells):
        c1 = min(c0 + chunk_cells, len(sizes))
        lo, hi = offsets[c0], offsets[c1]
        x = centres[cell_idx[lo:hi]] + 0.12 * rng.normal(size=(hi - lo, dim)).astype(np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return np.load(path, mmap_mode="r"), cell_idx, centres


def make_queries(centres, sizes, q, seed):
    rng = np.random.default_rng(seed + 1)
    cells = rng.choice(len(sizes), size=q, p=sizes / sizes.sum())
    x = centres[cells] + 0.12 * rng.normal(size=(q, centres.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), cells


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4_700_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=4096, help="queries per search_cells call")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--filtered-queries", type=int, default=50, help="queries for the IDSelectorBatch baseline"
    )
    parser.add_argument(
        "--global-queries", type=int, default=256, help="queries for the exact global baseline"
    )
    parser.add_argument(
        "--recall-n", type=int, default=200_000, help="background size of the compact-mode table"
    )
    parser.add_argument(
        "--shared",
        default=os.environ.get("GEOSWC_SHARED", str(Path(__file__).resolve().parents[1].parent / "shared")),
    )
    parser.add_argument("--workdir", help="where the memory-mapped index is written (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss

    rng = np.random.default_rng(args.seed)
    sizes, source = cell_sizes(args.n, Path(args.shared), rng)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_index_"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"background: {sizes.sum():,} x {args.dim} float16 over {len(sizes):,} cells ({source}); "
        f"median cell {int(np.median(sizes))}, max {sizes.max()}, empty {(sizes == 0).sum()}"
    )
    (emb, cell_idx, centres), t_gen = timed(make_embeddings, work / "source.npy", sizes, args.dim, args.seed)
    index, t_build = timed(
        BackgroundIndex(chunk_size=1 << 18).build,
        emb,
        cell_idx=cell_idx,
        latlon=np.zeros((len(cell_idx), 2)),
        ids=np.arange(len(cell_idx)),
        n_cells=len(sizes),
        fingerprint="bench",
        directory=work / "index",
    )
    index = BackgroundIndex.load(work / "index")  # memory-mapped, as in production
    print(f"generated in {t_gen:.1f} s, built + saved (streaming) in {t_build:.1f} s")

    queries, qcells = make_queries(centres, sizes, args.queries, args.seed)
    index.search_cells(queries[: args.batch], qcells[: args.batch], args.k)  # page in, warm up
    start = time.perf_counter()
    for s in range(0, len(queries), args.batch):
        sims, rows = index.search_cells(queries[s : s + args.batch], qcells[s : s + args.batch], args.k)
    swc_qps = len(queries) / (time.perf_counter() - start)
    print(f"search_cells (batched, numpy, {args.batch}/call): {swc_qps:,.0f} queries/s")

    flat = faiss.IndexFlatIP(args.dim)
    for s in range(0, len(index), 1 << 20):
        flat.add(np.ascontiguousarray(index.embeddings[s : s + (1 << 20)], dtype=np.float32))
    fq = args.filtered_queries
    start = time.perf_counter()
    agree = 0
    ref_sims, ref_rows = index.search_cells(queries[:fq], qcells[:fq], args.k)
    for i in range(fq):
        lo, hi = index.offsets[qcells[i]], index.offsets[qcells[i] + 1]
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.arange(lo, hi, dtype=np.int64)))
        d, r = flat.search(queries[i : i + 1], args.k, params=params)
        agree += np.allclose(d[0][r[0] >= 0], ref_sims[i][ref_rows[i] >= 0], atol=1e-4)
    filtered_qps = fq / (time.perf_counter() - start)
    print(
        f"faiss IDSelectorBatch filtered flat search: {filtered_qps:,.1f} queries/s ({fq} queries; "
        f"same top-{args.k} similarities for {agree}/{fq})"
    )
    gq = args.global_queries
    _, t_global = timed(flat.search, queries[:gq], args.k)
    global_qps = gq / t_global
    print(f"faiss exact global flat search (batch of {gq}): {global_qps:,.1f} queries/s")
    print(
        f"ratio search_cells / IDSelectorBatch: {swc_qps / filtered_qps:,.0f}x; "
        f"search_cells / exact global: {swc_qps / global_qps:,.0f}x"
    )
    del flat

    # Compact global-search modes on a subset: recall@10 against exact search, bytes per photo.
    rn = min(args.recall_n, len(index))
    sub_sizes, _ = cell_sizes(rn, Path(args.shared), np.random.default_rng(args.seed))
    sub_emb, sub_cells, sub_centres = make_embeddings(work / "subset.npy", sub_sizes, args.dim, args.seed + 7)
    sub = BackgroundIndex().build(
        sub_emb,
        cell_idx=sub_cells,
        latlon=np.zeros((rn, 2)),
        ids=np.arange(rn),
        n_cells=len(sub_sizes),
        fingerprint="bench",
    )
    rq, _ = make_queries(sub_centres, sub_sizes, 1000, args.seed + 7)
    _, exact = sub.search(rq, 10, mode="flat")
    d = args.dim
    rows = [
        ("flat float16 (exact)", {"mode": "flat"}, 2 * d),
        ("sq8", {"mode": "sq8"}, d),
        (f"pq m={d // 8}", {"mode": "pq", "pq_m": d // 8, "train_size": 10000}, d // 8),
        (f"pq m={d // 4}", {"mode": "pq", "pq_m": d // 4, "train_size": 10000}, d // 4),
        ("binary (1 bit/dim)", {"mode": "binary"}, d // 8),
        ("ivf flat nprobe=16", {"mode": "ivf", "nprobe": 16}, 4 * d),
    ]
    print(f"\ncompact modes on {rn:,} x {d} (1,000 queries), recall@10 vs exact:")
    print("| mode | bytes/photo | recall@10 | build s | queries/s |")
    print("|---|---|---|---|---|")
    for name, opts, nbytes in rows:
        opts = dict(opts)
        mode = opts.pop("mode")
        _, t_b = timed(sub.faiss_index, mode, **{k: v for k, v in opts.items() if k != "nprobe"})
        (_, r), t_s = timed(sub.search, rq, 10, mode=mode, **opts)
        print(f"| {name} | {nbytes} | {recall_at_k(r, exact):.3f} | {t_b:.1f} | {len(rq) / t_s:,.0f} |")


if __name__ == "__main__":
    main()
