import json

import numpy as np
import pandas as pd
import pytest
import torch

from geoswc.retrieval import BackgroundIndex, ResidualRetrievalModule
from retrieval_fixture import write_feature_cache


@pytest.fixture
def world(tmp_path):
    from geoswc.classifiers import create_head, save_head
    from geoswc.geocells import S2Partitioner

    rng = np.random.default_rng(0)
    n, dim = 300, 16
    centres = np.array([[48.85, 2.35], [40.71, -74.0], [35.68, 139.69], [-33.87, 151.21]])
    latlon = centres[rng.integers(0, 4, n)] + rng.normal(scale=2.0, size=(n, 2))
    cells = (
        S2Partitioner(min_images=5, max_images=(60,), start_level=2).fit(latlon[:, 0], latlon[:, 1]).geocells_
    )
    labels = cells.assign(latlon[:, 0], latlon[:, 1])
    labels[:4, -1] = -1  # photos without a fine cell
    n_fine = len(cells.fine)
    proto = rng.normal(size=(n_fine, dim))
    feats = proto[np.maximum(labels[:, -1], 0)] + 0.8 * rng.normal(size=(n, dim))
    ids = [f"{i}.jpg" for i in range(n)]
    write_feature_cache(tmp_path / "feats", feats, latlon, labels, cells.fingerprint, ids=ids)
    cells.save(tmp_path / "cells")
    torch.manual_seed(0)
    head = create_head("ce", in_features=dim, geocells=cells)
    with torch.no_grad():  # a head that mostly, not always, finds the prototype's cell
        head.fc.weight.copy_(torch.from_numpy(proto).float())
    save_head(head, tmp_path / "ce.safetensors")
    ResidualRetrievalModule(dim, 32).save(tmp_path / "rrm.safetensors", fingerprint=cells.fingerprint)
    # authors are a{i % 7} (write_feature_cache): exclude author a3 and photo 11.jpg (author a4)
    pd.DataFrame(
        {"IMG_ID": ["x.jpg", "11.jpg"], "AUTHOR": ["a3", "zz"], "LAT": [0, 0], "LON": [0, 0]}
    ).to_csv(tmp_path / "bench.csv", index=False)
    return tmp_path, cells, head, feats, labels, ids


def test_index_build_keeps_placeable_photos(world, capsys):
    from geoswc.cli import main

    tmp_path, cells, head, feats, labels, ids = world
    out = tmp_path / "index"
    rc = main(
        [
            "index",
            "build",
            "--features",
            str(tmp_path / "feats"),
            "--head",
            str(tmp_path / "ce.safetensors"),
            "--retrieval",
            str(tmp_path / "rrm.safetensors"),
            "--cells",
            str(tmp_path / "cells"),
            "-o",
            str(out),
            "--exclude",
            str(tmp_path / "bench.csv"),
            "--batch-size",
            "64",
        ]
    )
    assert rc == 0
    # Independent reference: run the head on every photo and apply the exclusions by hand.
    with torch.no_grad():
        top1 = head.fine_log_probs(
            head(torch.from_numpy(feats.astype(np.float16).astype(np.float32)))
        ).argmax(1)
    authors = np.array([f"a{i % 7}" for i in range(len(ids))])
    no_label = labels[:, -1] < 0
    by_author = (authors == "a3") & ~no_label
    by_id = (np.array(ids) == "11.jpg") & ~by_author & ~no_label
    correct = top1.numpy() == labels[:, -1]
    expected = ~no_label & ~by_author & ~by_id & correct
    assert 0 < expected.sum() < len(ids) - no_label.sum() - by_author.sum() - by_id.sum()

    index = BackgroundIndex.load(out, fingerprint=cells.fingerprint)
    assert sorted(index.ids.tolist()) == sorted(np.array(ids)[expected].tolist())
    rows = np.array([int(i.split(".")[0]) for i in index.ids])
    np.testing.assert_array_equal(index.cell_idx, labels[rows, -1])
    module = ResidualRetrievalModule.load(tmp_path / "rrm.safetensors")
    np.testing.assert_allclose(index.embeddings, module.embed(feats[rows].astype(np.float16)), atol=2e-3)
    report = json.loads((out / "build_report.json").read_text())
    assert report == {
        **report,
        "total": 300,
        "kept": int(expected.sum()),
        "no_label": int(no_label.sum()),
        "excluded_author": int(by_author.sum()),
        "excluded_id": 1,
        "wrong_cell": int((~no_label & ~by_author & ~by_id & ~correct).sum()),
    }
    assert f"kept {expected.sum()} of 300 photos" in capsys.readouterr().out
    assert not (out / "staging_embeddings.npy").exists() and (out / "config.yaml").is_file()


def test_index_build_rejects_other_partition(world, capsys):
    from geoswc.cli import main

    tmp_path, cells, *_ = world
    ResidualRetrievalModule(16, 32).save(tmp_path / "other.safetensors", fingerprint="not-these-cells")
    rc = main(
        [
            "index",
            "build",
            "--features",
            str(tmp_path / "feats"),
            "--head",
            str(tmp_path / "ce.safetensors"),
            "--retrieval",
            str(tmp_path / "other.safetensors"),
            "--cells",
            str(tmp_path / "cells"),
            "-o",
            str(tmp_path / "i2"),
        ]
    )
    assert rc == 2
    assert "not-these-cells" in capsys.readouterr().err


def test_index_build_without_head(world, capsys):
    """--head decides placeability: without it a placeable background is refused; with background=all every
    labelled photo is kept."""
    from geoswc.cli import main

    tmp_path, cells, head, feats, labels, ids = world
    common = [
        "index",
        "build",
        "--features",
        str(tmp_path / "feats"),
        "--retrieval",
        str(tmp_path / "rrm.safetensors"),
    ]
    common += ["--cells", str(tmp_path / "cells")]
    assert main([*common, "-o", str(tmp_path / "i_placeable")]) == 2
    assert "placeable background needs a head" in capsys.readouterr().err
    assert not (tmp_path / "i_placeable").exists()

    assert main([*common, "-o", str(tmp_path / "i_all"), "--set", "retrieval.background=all"]) == 0
    index = BackgroundIndex.load(tmp_path / "i_all")
    assert len(index) == int((labels[:, -1] >= 0).sum())
