"""Synthetic backbone features with cell structure: a direction per cell buried under strong scene nuisance."""

import json
from pathlib import Path

import numpy as np


def cell_features(n_cells=20, per_cell=8, dim=32, seed=0, *, cell_scale=0.6, scene_scale=1.0, noise=0.3):
    """(features (N, D) float32, labels (N,)): same-cell rows share a direction; a scene prototype shared across
    cells (8 kinds) dominates raw similarity, so the untrained embedding retrieves by scene, not by place."""
    rng = np.random.default_rng(seed)
    cells = rng.normal(size=(n_cells, dim))
    scenes = rng.normal(size=(8, dim))
    labels = np.repeat(np.arange(n_cells), per_cell)
    scene = rng.integers(0, 8, size=len(labels))
    feats = (
        cell_scale * cells[labels] + scene_scale * scenes[scene] + noise * rng.normal(size=(len(labels), dim))
    )
    return feats.astype(np.float32), labels


def write_feature_cache(folder, features, latlon, labels, fingerprint, ids=None):
    """A feature cache as documented in docs/architecture.md."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = ids if ids is not None else [f"p{i}" for i in range(len(features))]
    np.save(folder / "features.npy", np.asarray(features, np.float16))
    np.save(folder / "latlon.npy", np.asarray(latlon, np.float64))
    np.save(folder / "labels.npy", np.asarray(labels, np.int64))
    (folder / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (folder / "authors.txt").write_text("".join(f"a{i % 7}\n" for i in range(len(features))))
    meta = {
        "fingerprint": fingerprint,
        "backbone": "synthetic",
        "dim": int(features.shape[1]),
        "count": len(features),
    }
    (folder / "meta.json").write_text(json.dumps(meta) + "\n")
    return folder
