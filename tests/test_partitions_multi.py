"""Several partitions in one model (paper 4.1): CE and MvMF over a PlaNet-rule partition, HC over
GeoEstimation's, the background index searchable through each, and Search within Cell in the partition of the
head that picked the cell."""

import json

import numpy as np
import pytest
import torch

from geoswc.classifiers import create_backbone, create_head, default_partitions, load_head, save_head
from geoswc.config import Config
from geoswc.geocells import S2Partitioner
from geoswc.geolocator import Geolocator
from geoswc.retrieval.index import BackgroundIndex
from geoswc.retrieval.model import ResidualRetrievalModule

MAX_IMAGES = (120, 60, 25)
TARGET = 24


def _points(n=600, seed=0):
    rng = np.random.default_rng(seed)
    hubs = np.array([[48.86, 2.35], [40.71, -74.0], [35.68, 139.69], [-33.87, 151.21], [51.51, -0.13]])
    hub = rng.integers(0, len(hubs), size=n)
    return hubs[hub] + rng.normal(scale=[0.3, 0.4], size=(n, 2))


@pytest.fixture(scope="module")
def latlon():
    return _points()


@pytest.fixture(scope="module")
def cells(latlon):
    return S2Partitioner(min_images=4, max_images=MAX_IMAGES, target_cells=TARGET).fit(*latlon.T).geocells_


def test_the_paper_assigns_the_planet_partition_to_ce_mvmf_and_geoestimations_to_hc(cells):
    by_rule = cells.partitions_by_rule()
    assert by_rule["max_images"] == ["cells_4_120", "cells_4_60", "cells_4_25"]
    assert by_rule["target_cells"] == [f"cells_4_n{TARGET}"]
    assert set(cells.names) == {"cells_4_120", "cells_4_60", "cells_4_25", f"cells_4_n{TARGET}"}
    for kind in ("backbone", "ce", "mvmf"):
        assert default_partitions(kind, cells) == [f"cells_4_n{TARGET}"]
    assert default_partitions("hc", cells) == ["cells_4_120", "cells_4_60", "cells_4_25"]
    # One rule alone: every head uses every partition, as before.
    alone = S2Partitioner(min_images=4, max_images=MAX_IMAGES).fit(*_points().T).geocells_
    assert default_partitions("ce", alone) is None and default_partitions("hc", alone) is None
    with pytest.raises(ValueError, match="choose one of: backbone, ce, hc, mvmf"):
        default_partitions("vmf", cells)
    # The PlaNet rule's count: N, N+1 or N+2 cells (a split adds up to three).
    assert TARGET <= len(cells.partition(f"cells_4_n{TARGET}")) <= TARGET + 2


def test_heads_learn_from_the_labels_of_their_own_partitions(cells, latlon):
    torch.manual_seed(0)
    labels = torch.from_numpy(cells.assign(*latlon.T))
    target = cells.partition(f"cells_4_n{TARGET}")
    ce = create_head("ce", in_features=8, geocells=cells, partitions=default_partitions("ce", cells))
    assert ce.n_fine == len(target) and ce.partition == target.name
    features = torch.randn(len(latlon), 8)
    outputs = ce(features)
    # Reference: the target partition's own assignment, and torch's cross-entropy over the labelled photos.
    truth = torch.from_numpy(target.assign(*latlon.T))
    keep = truth >= 0
    expected = torch.nn.functional.cross_entropy(outputs["logits"][keep], truth[keep])
    assert torch.allclose(ce.loss(outputs, labels, torch.from_numpy(latlon)), expected)
    assert torch.allclose(ce.centers_deg, torch.from_numpy(target.centers_deg))

    # HC over the GeoEstimation partitions equals HC built on those partitions alone, weights shared.
    names = default_partitions("hc", cells)
    hc = create_head("hc", in_features=8, geocells=cells, partitions=names)
    alone = cells.select(names)
    reference = create_head("hc", in_features=8, geocells=alone)
    reference.load_state_dict(hc.state_dict())
    assert np.array_equal(hc.hierarchy.numpy(), alone.hierarchy)
    assert torch.allclose(hc.fine_log_probs(hc(features)), reference.fine_log_probs(reference(features)))
    own_labels = torch.from_numpy(alone.assign(*latlon.T))
    assert torch.allclose(
        hc.loss(hc(features), labels, None), reference.loss(reference(features), own_labels, None)
    )


def test_a_head_file_keeps_its_partitions(cells, tmp_path):
    mvmf = create_head("mvmf", in_features=8, geocells=cells, partitions=default_partitions("mvmf", cells))
    loaded = load_head(save_head(mvmf, tmp_path / "mvmf.safetensors"), geocells=cells)
    assert loaded.partitions == [f"cells_4_n{TARGET}"] and loaded.n_fine == mvmf.n_fine
    hc = create_head("hc", in_features=8, geocells=cells, partitions=default_partitions("hc", cells))
    with pytest.raises(ValueError, match="same partition"):
        loaded.init_from_classifier(hc)
    with pytest.raises(ValueError, match="no partition 'cells_9'.*choose one of"):
        create_head("ce", in_features=8, geocells=cells, partitions=["cells_9"])


def _brute_force(emb, rows_in_cell, query, k):
    scores = emb[rows_in_cell].astype(np.float32) @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return rows_in_cell[order]


def test_the_index_searches_within_the_cells_of_any_partition(cells, latlon, tmp_path):
    rng = np.random.default_rng(1)
    target = cells.partition(f"cells_4_n{TARGET}")
    fine_hc = cells.partition("cells_4_25")
    own = target.assign(*latlon.T)
    rows = np.flatnonzero(own >= 0)
    emb = rng.normal(size=(len(rows), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = BackgroundIndex(dtype="float32").build(
        emb,
        cell_idx=own[rows],
        latlon=latlon[rows],
        ids=[f"p{i}" for i in rows],
        n_cells=len(target),
        fingerprint=cells.fingerprint,
        partition=target.name,
    )
    other = fine_hc.assign(*index.latlon.T)  # every row's cell in HC's fine partition, -1 outside
    assert (other < 0).any(), "the fixture should leave some background photos outside HC's fine cells"
    index.add_partition(fine_hc.name, other, len(fine_hc))
    index.save(tmp_path / "index")
    loaded = BackgroundIndex.load(tmp_path / "index")
    assert loaded.partitions == {target.name: len(target), fine_hc.name: len(fine_hc)}
    assert np.array_equal(
        loaded.cell_sizes(fine_hc.name), np.bincount(other[other >= 0], minlength=len(fine_hc))
    )

    queries = rng.normal(size=(12, 16)).astype(np.float32)
    cells_q = rng.integers(0, len(fine_hc), size=12)
    for use in (loaded, index):
        sims, found = use.search_cells(queries, cells_q, 5, partition=fine_hc.name)
        t_sims, t_found = use.search_cells(
            torch.from_numpy(queries), torch.from_numpy(cells_q), 5, partition=fine_hc.name
        )
        assert np.array_equal(t_found.numpy(), found)
        for q in range(12):
            expected = _brute_force(
                np.asarray(use.embeddings), np.flatnonzero(other == cells_q[q]), queries[q], 5
            )
            assert found[q][found[q] >= 0].tolist() == expected.tolist()
    with pytest.raises(ValueError, match="no rows per cell of partition 'cells_4_60'"):
        loaded.search_cells(queries, cells_q, 5, partition="cells_4_60")


@pytest.fixture(scope="module")
def multi_model(cells, latlon, tmp_path_factory):
    """A model whose CE/MvMF use the PlaNet partition and HC GeoEstimation's, with an index over both."""
    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet", pretrained=False).eval()
    dim = backbone.num_features
    heads = {
        kind: create_head(kind, in_features=dim, geocells=cells, partitions=default_partitions(kind, cells))
        for kind in ("ce", "hc", "mvmf")
    }
    config = Config().merge(
        {"data": {"image_size": 64, "eval_resize": "longest"}, "retrieval": {"hidden_dim": 32}}
    )
    retrieval = ResidualRetrievalModule(dim, hidden_dim=32).eval()
    model = Geolocator(
        backbone=backbone,
        geocells=cells,
        heads=heads,
        retrieval=retrieval,
        config=config,
        backbone_name="test_efficientnet",
    )
    rng = np.random.default_rng(2)
    features = torch.from_numpy(rng.normal(size=(len(latlon), dim)).astype(np.float32))
    target = heads["ce"].partition
    own = cells.partition(target).assign(*latlon.T)
    rows = np.flatnonzero(own >= 0)
    index = BackgroundIndex().build(
        model.embed(features[rows]).numpy(),
        cell_idx=own[rows],
        latlon=latlon[rows],
        ids=[f"p{i}" for i in rows],
        n_cells=len(cells.partition(target)),
        fingerprint=cells.fingerprint,
        partition=target,
    )
    labels = cells.assign(*np.asarray(index.latlon).T)  # every index row's cell in every partition
    for g, part in enumerate(cells.partitions):
        if part.name != target:
            index.add_partition(part.name, labels[:, g], len(part))
    model.index = index
    model._check_index_partitions()
    folder = model.save_pretrained(tmp_path_factory.mktemp("multi") / "model")
    queries = torch.from_numpy(rng.normal(size=(20, dim)).astype(np.float32))
    return model, folder, queries


def test_search_within_cell_uses_the_partition_of_the_head_that_picked_the_cell(multi_model, cells):
    model, _, queries = multi_model
    for kind in ("hc", "ce", "mvmf"):
        part = cells.partition(model.heads[kind].partition)
        pred = model.locate(queries, head=kind, mode="swc", top_cells=1)
        assert (pred.cell_idx < len(part)).all()
        used = pred.neighbour_rows >= 0
        assert used.any()
        # Every neighbour lies in the head's best cell of the head's own partition.
        cell_of_row = part.assign(*np.asarray(model.index.latlon).T)
        for q in range(len(queries)):
            assert (cell_of_row[pred.neighbour_rows[q][used[q]]] == pred.cell_idx[q]).all()
        record = pred.to_records(model)[0]
        assert record["cell_token"] == part.tokens[pred.cell_idx[0]]


def test_the_model_folder_records_each_heads_partitions_and_loads_them(multi_model, cells):
    model, folder, queries = multi_model
    meta = json.loads((folder / "geolocator.json").read_text())
    assert meta["format_version"] == 3
    assert meta["partitions"]["hc"] == ["cells_4_120", "cells_4_60", "cells_4_25"]
    assert meta["partitions"]["mvmf"] == [f"cells_4_n{TARGET}"]
    assert "index/partition_cells_4_25_rows.npy" in meta["sha256"]
    loaded = Geolocator.from_pretrained(folder, device="cpu")
    assert loaded.resolve_head() == "mvmf"
    for kind in ("hc", "mvmf"):
        a = model.locate(queries, head=kind, mode="swc")
        b = loaded.locate(queries, head=kind, mode="swc")
        assert np.array_equal(a.cell_idx, b.cell_idx) and np.allclose(a.latlon_deg, b.latlon_deg)

    # A recorded assignment that disagrees with the head file is refused.
    meta["partitions"]["hc"] = ["cells_4_25"]
    (folder / "geolocator.json").write_text(json.dumps(meta))
    try:
        with pytest.raises(ValueError, match="hc.safetensors predicts over the partitions"):
            Geolocator.from_pretrained(folder, device="cpu")
    finally:
        meta["partitions"]["hc"] = ["cells_4_120", "cells_4_60", "cells_4_25"]
        (folder / "geolocator.json").write_text(json.dumps(meta))


def test_an_index_without_a_heads_partition_is_refused(multi_model, cells, latlon):
    model, _, _ = multi_model
    target = model.heads["ce"].partition
    own = cells.partition(target).assign(*latlon.T)
    rows = np.flatnonzero(own >= 0)
    bare = BackgroundIndex().build(
        np.asarray(model.index.embeddings[: len(rows)]),
        cell_idx=np.sort(own[rows]),
        latlon=latlon[rows],
        ids=[f"p{i}" for i in rows],
        n_cells=len(cells.partition(target)),
        fingerprint=cells.fingerprint,
        partition=target,
    )
    with pytest.raises(ValueError, match="head 'hc' predicts the cells of partition 'cells_4_25'"):
        Geolocator(
            backbone=model.backbone,
            geocells=cells,
            heads=dict(model.heads),
            retrieval=model.retrieval,
            index=bare,
            config=model.config,
            backbone_name="test_efficientnet",
        )


def test_a_folder_of_format_2_still_loads_with_every_head_on_all_partitions(tiny_model_dir):
    meta_path = tiny_model_dir / "geolocator.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 2
    meta.pop("partitions", None)
    meta_path.write_text(json.dumps(meta))
    model = Geolocator.from_pretrained(tiny_model_dir, device="cpu")
    for kind in ("ce", "mvmf"):
        assert model.head_partition(kind).name == model.geocells.fine.name
    assert model.heads["hc"].partitions == model.geocells.names
    assert model.predict(np.zeros((48, 64, 3), np.uint8))[0]["head"] == "mvmf"


@pytest.fixture
def tiny_model_dir(tmp_path):
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path / "tiny")
