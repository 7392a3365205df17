"""A damaged evaluation store (``geoswc evaluate -o DIR``'s ``store/``, read by ``geoswc sweep``) is one line naming
the damaged file, not a bare JSON or numpy error."""

from __future__ import annotations

import numpy as np
import pytest

from geoswc.evaluation.sweep import EvalStore, HeadOutputs


@pytest.fixture
def store(tmp_path):
    n = 4
    heads = {
        "ce": HeadOutputs(
            top_cells=np.zeros((n, 2), np.int64),
            top_probs=np.full((n, 2), 0.5, np.float32),
            latlon_deg=np.zeros((n, 2)),
            density=np.zeros((n, 3), np.float32),
        )
    }
    saved = EvalStore(
        ids=[f"p{i}.jpg" for i in range(n)],
        truth_deg=np.zeros((n, 2)),
        evaluated=np.ones(n, bool),
        features=None,
        embeddings=np.ones((n, 8), np.float32),
        heads=heads,
        meta={"heads": ["ce"]},
    ).save(tmp_path / "store")
    assert len(EvalStore.load(saved).ids) == n
    return saved


@pytest.mark.parametrize(
    "name, damage",
    [
        ("meta.json", lambda data: data[: len(data) // 2]),
        ("truth_latlon.npy", lambda data: data[:-8]),
        ("embeddings.npy", lambda data: data[:-8]),
        ("heads/ce_top_probs.npy", lambda data: data[:100]),
    ],
)
def test_a_damaged_store_file_is_one_line_naming_it(store, name, damage):
    path = store / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError) as err:
        EvalStore.load(store)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path)), text
