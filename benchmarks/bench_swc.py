"""Search within Cell benchmarks: vectorised DBSCAN against one scikit-learn call per photo, and the whole
search-within-cell step over an index with the real per-cell background sizes.

    python benchmarks/bench_swc.py                      # 100k photos, K = 10
    python benchmarks/bench_swc.py --photos 20000 --sklearn-photos 500

Prints times measured in the same run and their ratio; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import DBSCAN

from geoswc.data.sphere import EARTH_RADIUS_KM
from geoswc.swc.cluster import largest_cluster_mean

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
KM_PER_DEG_LAT = np.pi * EARTH_RADIUS_KM / 180


def neighbour_coordinates(n_photos: int, k: int, seed: int = 0) -> np.ndarray:
    """K neighbours per photo scattered a few km around a real MP16 location (uniform if it is missing)."""
    rng = np.random.default_rng(seed)
    sample = SHARED / "coordinates" / "mp16_sample_100k.csv"
    if sample.is_file():
        coords = np.loadtxt(sample, delimiter=",", skiprows=1)
        centre = coords[rng.integers(0, len(coords), n_photos)]
    else:
        centre = np.stack([rng.uniform(-60, 70, n_photos), rng.uniform(-180, 180, n_photos)], axis=1)
    spread_km = rng.uniform(0.2, 5.0, size=(n_photos, 1, 1))
    offset_km = rng.normal(size=(n_photos, k, 2)) * spread_km
    lat = np.clip(centre[:, None, 0] + offset_km[..., 0] / KM_PER_DEG_LAT, -89.9, 89.9)
    lon = centre[:, None, 1] + offset_km[..., 1] / (KM_PER_DEG_LAT * np.cos(np.radians(lat)))
    return np.stack([lat, (lon + 180) % 360 - 180], axis=-1)


def sklearn_per_photo(latlon_deg: np.ndarray, eps_km: float, min_samples: int) -> np.ndarray:
    """The baseline: one DBSCAN fit per photo, largest cluster (first on ties), mean of unit vectors."""
    out = np.empty((len(latlon_deg), 2))
    model = DBSCAN(eps=eps_km / EARTH_RADIUS_KM, min_samples=min_samples, metric="haversine")
    for i, pts in enumerate(latlon_deg):
        labels = model.fit(np.radians(pts)).labels_
        if (labels < 0).all():
            chosen = pts[:1]
        else:
            counts = np.bincount(labels[labels >= 0])
            first = np.flatnonzero((labels >= 0) & (counts[np.maximum(labels, 0)] == counts.max()))[0]
            chosen = pts[labels == labels[first]]
        lat, lon = np.radians(chosen[:, 0]), np.radians(chosen[:, 1])
        v = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1).sum(0)
        v /= np.linalg.norm(v)
        out[i] = np.degrees([np.arcsin(v[2]), np.arctan2(v[1], v[0])])
    return out


def bench_clustering(args: argparse.Namespace) -> None:
    latlon = neighbour_coordinates(args.photos, args.k)
    valid = np.ones(latlon.shape[:2], dtype=bool)
    for min_samples in (1, 3):
        start = time.perf_counter()
        res = largest_cluster_mean(latlon, valid, eps_km=args.eps_km, min_samples=min_samples)
        vec_s = time.perf_counter() - start

        sub = latlon[: args.sklearn_photos]
        start = time.perf_counter()
        ref = sklearn_per_photo(sub, args.eps_km, min_samples)
        per_photo_s = (time.perf_counter() - start) / len(sub)
        sk_s = per_photo_s * args.photos
        agree = np.allclose(res.latlon_deg[: len(sub)], ref, atol=1e-9)
        print(
            f"clustering K={args.k} min_samples={min_samples}: vectorised {args.photos} photos {vec_s:.2f} s "
            f"({vec_s / args.photos * 1e6:.1f} us/photo); sklearn per photo {per_photo_s * 1e3:.2f} ms/photo "
            f"-> {sk_s:.0f} s for {args.photos} (measured on {len(sub)}); ratio {sk_s / vec_s:.0f}x; "
            f"same results: {agree}"
        )


def bench_search_within_cell(args: argparse.Namespace) -> None:
    import torch

    from geoswc.retrieval.index import BackgroundIndex
    from geoswc.swc.search import search_within_cell

    sizes_csv = SHARED / "cells" / "visloc_background_per_cell.csv"
    rng = np.random.default_rng(1)
    if sizes_csv.is_file():
        sizes = np.loadtxt(sizes_csv, delimiter=",", skiprows=1, dtype=np.int64)[:, 1]
    else:
        sizes = rng.integers(1, 60, size=26406)
    sizes = sizes[: args.cells] if args.cells else sizes
    n_cells, n_rows = len(sizes), int(sizes.sum())
    cell_idx = np.repeat(np.arange(n_cells), sizes)
    emb = rng.normal(size=(n_rows, args.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    latlon = neighbour_coordinates(n_rows, 1)[:, 0]
    index = BackgroundIndex().build(
        emb,
        cell_idx=cell_idx,
        latlon=latlon,
        ids=[str(i) for i in range(n_rows)],
        n_cells=n_cells,
        fingerprint="bench",
    )
    queries = torch.from_numpy(rng.normal(size=(args.queries, args.dim)).astype(np.float32))
    queries = torch.nn.functional.normalize(queries, dim=1)
    cells = torch.from_numpy(rng.choice(n_cells, size=args.queries, p=sizes / sizes.sum()))
    start = time.perf_counter()
    sims, rows = index.search_cells(queries, cells, args.k)
    search_s = time.perf_counter() - start
    sims, rows = sims.numpy(), rows.numpy()
    valid = rows >= 0
    neighbours = np.where(valid[..., None], index.latlon[np.maximum(rows, 0)], np.nan)
    start = time.perf_counter()
    largest_cluster_mean(neighbours, valid, eps_km=args.eps_km, similarity=sims)
    cluster_s = time.perf_counter() - start
    start = time.perf_counter()
    search_within_cell(queries, cells, index, k=args.k, eps_km=args.eps_km)
    total_s = time.perf_counter() - start
    print(
        f"search within cell: {n_rows} background photos in {n_cells} cells (dim {args.dim}), "
        f"{args.queries} queries: index.search_cells {search_s:.2f} s, clustering {cluster_s:.3f} s "
        f"({100 * cluster_s / (search_s + cluster_s):.1f} % of search + clustering); "
        f"search_within_cell end to end {total_s:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=100_000)
    parser.add_argument("--sklearn-photos", type=int, default=2000, help="photos timed with the baseline")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--eps-km", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1792, help="embedding size (EfficientNet-B4: 1792)")
    parser.add_argument("--cells", type=int, default=0, help="use the first N cells only (0 = all)")
    parser.add_argument("--skip-search", action="store_true", help="only the clustering benchmark")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.system()}, numpy {np.__version__}"
    )
    bench_clustering(args)
    if not args.skip_search:
        bench_search_within_cell(args)


if __name__ == "__main__":
    main()
