"""Near-duplicate groups (``geoswc tag --duplicates``): the inverted-file method against exact all-pairs
comparison, measured in the same run.

Archive: ``--n`` random unit vectors (D = ``--dim``, float16, memory-mapped like a tag run's
``OUT.embeddings.npy``), optionally clustered (``--clusters``: each vector a cluster direction plus noise,
cosine ~0.5 within a cluster, as real embeddings bunch by subject), with planted near-duplicate groups of 2-5
photos: each copy is an earlier member of its group plus noise (cosine 0.93-0.995 to it), so a group can be a
chain whose ends fall below the threshold. Unplanted pairs lie far below any duplicate threshold, so the true
groups are the connected components of the planted groups' pairs at or above it (scipy).

The exact method is timed on the first ``--exact-n`` photos (quadratic: the full archive would take hours at
this size) and extrapolated as ``(n / exact_n)^2``; the ivf method is timed on the same subset and on the whole
archive, and both are checked against the true groups.

    python benchmarks/bench_duplicates.py                              # 200k x 1280, exact on 50k
    python benchmarks/bench_duplicates.py --n 50000 --exact-n 50000    # quick, no extrapolation

Prints times and the ratio; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from geoswc.tagging.similar import DUPLICATE_NPROBE, duplicate_groups


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_archive(path: Path, n: int, dim: int, clusters: int, dup_fraction: float, seed: int):
    """Writes the float16 archive; returns (memmap, list of planted groups' rows)."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    centres = unit(rng.normal(size=(max(clusters, 1), dim)).astype(np.float32))
    for start in range(0, n, 65536):
        end = min(n, start + 65536)
        x = rng.normal(size=(end - start, dim)).astype(np.float32)
        if clusters:
            # centre + noise of norm ~1: cosine ~0.5 between two photos of a cluster.
            x = centres[rng.integers(0, clusters, end - start)] + x / np.sqrt(dim)
        out[start:end] = unit(x)
    sizes = rng.integers(2, 6, size=int(n * dup_fraction / 3.5))
    rows = rng.permutation(n)[: sizes.sum()]
    groups = np.split(rows, np.cumsum(sizes)[:-1])
    for members in groups:
        for k in range(1, len(members)):
            source = out[members[rng.integers(0, k)]].astype(np.float32)
            eps = rng.uniform(0.1, 0.4)  # cosine 1 / sqrt(1 + eps^2): 0.93-0.995
            out[members[k]] = unit(source + eps * rng.normal(size=dim).astype(np.float32) / np.sqrt(dim))
    out.flush()
    return np.load(path, mmap_mode="r"), groups


def true_labels(vectors, groups, n: int, threshold: float) -> np.ndarray:
    """Connected components (scipy) of the planted groups' pairs at or above the threshold, rows < n."""
    ii, jj = [], []
    for members in groups:
        members = np.sort(members[members < n])
        x = np.asarray(vectors[members], dtype=np.float32)
        a, b = np.nonzero(np.triu(x @ x.T >= threshold, k=1))
        ii.append(members[a])
        jj.append(members[b])
    ii, jj = np.concatenate(ii), np.concatenate(jj)
    graph = coo_matrix((np.ones(len(ii)), (ii, jj)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    return np.where(sizes[labels] >= 2, labels + 1, 0)


def linked_pair_recall(truth: np.ndarray, found: np.ndarray) -> float:
    """Share of the pairs of photos grouped together by ``truth`` that ``found`` groups together too."""
    grouped = truth > 0
    keys, counts = np.unique(np.stack([truth[grouped], found[grouped]]), axis=1, return_counts=True)
    together = counts[keys[1] > 0]
    sizes = np.bincount(truth[grouped])
    pairs = int((sizes * (sizes - 1) // 2).sum())
    return float((together * (together - 1) // 2).sum() / pairs) if pairs else 1.0


def group_count(labels: np.ndarray) -> int:
    return len(np.unique(labels[labels > 0]))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same groups, whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--exact-n", type=int, default=50_000, help="photos the exact baseline is timed on")
    parser.add_argument("--clusters", type=int, default=0, help="cluster directions (0: uniform vectors)")
    parser.add_argument("--dup-fraction", type=float, default=0.05, help="share of photos in planted groups")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--nprobe", type=int, default=DUPLICATE_NPROBE)
    parser.add_argument("--workdir", help="where the archive is written and kept (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_duplicates_") as work:
            run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    exact_n = min(args.exact_n, args.n)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"archive {args.n:,} x {args.dim} float16 ({args.n * args.dim * 2 / 2**30:.2f} GiB), "
        f"{'clustered (' + str(args.clusters) + ' directions)' if args.clusters else 'uniform'}, "
        f"threshold {args.threshold}, nprobe {args.nprobe}"
    )
    (vectors, groups), t_gen = timed(
        make_archive, work / "embeddings.npy", args.n, args.dim, args.clusters, args.dup_fraction, args.seed
    )
    print(f"generated in {t_gen:.1f} s: {sum(map(len, groups)):,} photos in {len(groups):,} planted groups")

    subset = vectors[:exact_n]
    truth_subset = true_labels(vectors, groups, exact_n, args.threshold)
    exact, t_exact = timed(duplicate_groups, subset, threshold=args.threshold, method="exact")
    ivf_subset, t_ivf_subset = timed(
        duplicate_groups, subset, threshold=args.threshold, method="ivf", nprobe=args.nprobe
    )
    print(f"\n{exact_n:,} photos ({group_count(truth_subset):,} true groups):")
    print(f"  exact: {t_exact:.1f} s, same groups as the truth: {same_partition(exact, truth_subset)}")
    print(
        f"  ivf:   {t_ivf_subset:.1f} s, same groups as exact: {same_partition(ivf_subset, exact)}, "
        f"linked-pair recall {linked_pair_recall(exact, ivf_subset):.4f}; "
        f"ivf {t_exact / t_ivf_subset:.1f}x faster"
    )
    if args.n > exact_n:
        truth = true_labels(vectors, groups, args.n, args.threshold)
        ivf, t_ivf = timed(
            duplicate_groups, vectors, threshold=args.threshold, method="ivf", nprobe=args.nprobe
        )
        t_exact_full = t_exact * (args.n / exact_n) ** 2
        print(f"\n{args.n:,} photos ({group_count(truth):,} true groups):")
        print(
            f"  ivf:   {t_ivf:.1f} s, same groups as the truth: {same_partition(ivf, truth)}, "
            f"linked-pair recall {linked_pair_recall(truth, ivf):.4f}"
        )
        print(
            f"  exact (extrapolated from {exact_n:,}): {t_exact_full:.0f} s; ivf {t_exact_full / t_ivf:.1f}x faster"
        )


if __name__ == "__main__":
    main()
