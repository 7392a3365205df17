"""Geocells at MP16 scale: vectorised S2 ids and three-granularity partitioning on one CPU core.

The 100k MP16 sample (or, without ../shared, the bundled 3k subset) is resampled with small Gaussian jitter
to 4,723,695 points, the size of the MP16 training set. The baseline, measured in the same run, is a
per-point s2sphere loop on a subsample, extrapolated to all points.

    python benchmarks/bench_geocells.py [--points 4723695] [--baseline-points 20000] [--jitter-deg 0.01]
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import s2sphere  # noqa: E402

from geoswc.geocells import S2Partitioner, latlng_to_cell_id  # noqa: E402
from geoswc.geocells.io import read_coordinates  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_SAMPLE = (
    Path(os.environ.get("GEOSWC_SHARED", ROOT.parent / "shared"))
    / "reference/coordinates/mp16_sample_100k.csv"
)
BUNDLED_SAMPLE = ROOT / "tests/data/mp16_sample_3k.csv"


def resample(lat, lon, n, jitter_deg, seed=0):
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(lat), n)
    out_lat = np.clip(lat[pick] + rng.normal(0.0, jitter_deg, n), -90.0, 90.0)
    out_lon = (lon[pick] + rng.normal(0.0, jitter_deg, n) + 180.0) % 360.0 - 180.0
    return out_lat, out_lon


def s2sphere_ids(lat, lon):
    return np.array(
        [s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id() for a, b in zip(lat, lon)],
        dtype=np.uint64,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=4_723_695)
    parser.add_argument("--baseline-points", type=int, default=20_000)
    parser.add_argument("--jitter-deg", type=float, default=0.01)
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    source = SHARED_SAMPLE if SHARED_SAMPLE.is_file() else BUNDLED_SAMPLE
    _, lat0, lon0 = read_coordinates(source)
    lat, lon = resample(lat0, lon0, args.points, args.jitter_deg)
    print(
        f"points: {len(lat):,} resampled from {source.name} ({len(lat0):,}) with {args.jitter_deg} deg jitter"
    )

    t = time.perf_counter()
    ids = latlng_to_cell_id(lat, lon)
    t_ids = time.perf_counter() - t

    t = time.perf_counter()
    geocells = S2Partitioner(min_images=50, max_images=(5000, 2000, 1000)).fit(lat, lon).geocells_
    t_fit = time.perf_counter() - t

    # Peak of the allocations made by fit, measured in a second run (tracemalloc slows allocation down).
    tracemalloc.start()
    S2Partitioner(min_images=50, max_images=(5000, 2000, 1000)).fit(lat, lon)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    n_base = min(args.baseline_points, len(lat))
    t = time.perf_counter()
    base_ids = s2sphere_ids(lat[:n_base].tolist(), lon[:n_base].tolist())
    t_base = (time.perf_counter() - t) * len(lat) / n_base
    assert np.array_equal(base_ids, ids[:n_base]), "s2sphere and geoswc disagree on cell ids"

    rows = [
        ("S2 leaf ids (vectorised)", t_ids, f"{len(lat) / t_ids / 1e6:.2f} M points/s"),
        (
            "fit: ids + sort + 3 granularities",
            t_fit,
            ", ".join(f"{p.name}: {len(p)}" for p in geocells.partitions),
        ),
        (f"s2sphere per-point ids (from {n_base:,})", t_base, f"{len(lat) / t_base / 1e3:.1f} k points/s"),
    ]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores visible, 1 thread used; python {platform.python_version()}"
    )
    print(f"{'step':<38} {'seconds':>9}  notes")
    for name, sec, note in rows:
        print(f"{name:<38} {sec:>9.2f}  {note}")
    print(
        f"peak memory: {traced_peak / 2**30:.2f} GiB traced in fit; process max RSS {max_rss_kib / 2**20:.2f} GiB"
    )
    print(f"ratio s2sphere ids / vectorised ids: {t_base / t_ids:.0f}x")
    print(f"ratio s2sphere ids alone / whole vectorised fit: {t_base / t_fit:.0f}x")


if __name__ == "__main__":
    main()
