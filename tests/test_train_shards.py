import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from geoswc.cli import main as cli_main


def train_main(argv):
    return cli_main(["train", *argv])


COMMON = [
    "--preset",
    "tiny",
    "--cpu",
    "--set",
    "data.image_size=32",
    "--set",
    "backbone.weights=null",
    "--set",
    "backbone.pretrained=false",
    "--set",
    "train.seed=3",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic world, its cells, and shards of its training photos labelled with those cells."""
    from geoswc.data.metadata import read_metadata
    from geoswc.data.shards import write_shards
    from geoswc.data.synth import make_world
    from geoswc.geocells import S2Partitioner

    root = tmp_path_factory.mktemp("world")
    make_world(root, n_train=60, n_test=20, seed=2, image_size=40, progress=False)
    meta = read_metadata(root / "train.csv")
    cells = (
        S2Partitioner(min_images=5, max_images=(40, 20, 10))
        .fit(meta["LAT"].to_numpy(), meta["LON"].to_numpy())
        .geocells_
    )
    cells.save(root / "cells")
    write_shards(
        meta,
        root / "shards",
        images_root=root / "images",
        labeler=cells.assign,
        fingerprint=str(cells.fingerprint),
        samples_per_shard=25,
        progress=False,
    )
    return root


def _cache(folder):
    ids = (folder / "ids.txt").read_text().split()
    return (
        {i: row for row, i in enumerate(ids)},
        np.load(folder / "features.npy"),
        np.load(folder / "labels.npy"),
    )


def test_shard_labels_are_the_geocells_assignment(world, tmp_path):
    from geoswc.data.metadata import read_metadata
    from geoswc.geocells import Geocells

    rc = train_main(
        [
            "features",
            "--cells",
            str(world / "cells"),
            "--shards",
            str(world / "shards"),
            "--out",
            str(tmp_path),
            *COMMON,
        ]
    )
    assert rc == 0
    rows, _, labels = _cache(tmp_path)
    meta = read_metadata(world / "train.csv").set_index("IMG_ID")
    truth = Geocells.load(world / "cells").assign(meta["LAT"].to_numpy(), meta["LON"].to_numpy())
    assert sorted(rows) == sorted(meta.index)
    for img_id, row in rows.items():
        assert labels[row].tolist() == truth[meta.index.get_loc(img_id)].tolist()


class Killed(Exception):
    """Stands for the process being killed."""


def test_shard_feature_merge_killed_midway_is_completed_on_rerun(world, tmp_path, monkeypatch):
    args = ["features", "--cells", str(world / "cells"), "--shards", str(world / "shards"), *COMMON]
    assert train_main([*args, "--out", str(tmp_path / "ref")]) == 0
    load = np.load

    def load_until_second_part(path, *a, **kw):
        if Path(path).name == "part_00001.npz":
            raise Killed
        return load(path, *a, **kw)

    monkeypatch.setattr(np, "load", load_until_second_part)
    with pytest.raises(Killed):
        train_main([*args, "--out", str(tmp_path / "o")])
    monkeypatch.undo()
    assert len(list((tmp_path / "o" / "parts").glob("part_*.npz"))) == 3
    assert not (tmp_path / "o" / "meta.json").exists() and not (tmp_path / "o" / "features.npy").exists()

    assert train_main([*args, "--out", str(tmp_path / "o")]) == 0
    for name in ("features.npy", "latlon.npy", "labels.npy", "ids.txt", "authors.txt", "meta.json"):
        assert (tmp_path / "o" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not (tmp_path / "o" / "parts").exists() and not list((tmp_path / "o").glob("*.tmp.*"))


@pytest.mark.slow
def test_features_from_shards_equal_features_from_csv(world, tmp_path):
    args = ["--cells", str(world / "cells"), *COMMON, "--batch-size", "7"]
    assert (
        train_main(["features", "--shards", str(world / "shards"), "--out", str(tmp_path / "s"), *args]) == 0
    )
    assert (
        train_main(
            [
                "features",
                "--csv",
                str(world / "train.csv"),
                "--images",
                str(world / "images"),
                "--out",
                str(tmp_path / "c"),
                *args,
            ]
        )
        == 0
    )
    rows_s, feats_s, labels_s = _cache(tmp_path / "s")
    rows_c, feats_c, labels_c = _cache(tmp_path / "c")
    assert rows_s.keys() == rows_c.keys()
    order_s = [rows_s[i] for i in rows_c]
    np.testing.assert_allclose(
        feats_s[order_s].astype(np.float32), feats_c.astype(np.float32), rtol=2e-3, atol=2e-3
    )
    np.testing.assert_array_equal(labels_s[order_s], labels_c)


@pytest.mark.slow
def test_backbone_trains_from_shards_and_resumes(world, tmp_path):
    args = [
        "backbone",
        "--cells",
        str(world / "cells"),
        "--shards",
        str(world / "shards"),
        "--val-shards",
        str(world / "shards"),
        *COMMON,
        "--set",
        "backbone.batch_size=10",
        "--set",
        "backbone.epochs=2",
    ]
    assert train_main([*args, "--out", str(tmp_path / "a"), "--max-steps", "3"]) == 0
    assert json.loads((tmp_path / "a/checkpoints/backbone/last/position.json").read_text())["step"] == 3
    assert train_main([*args, "--out", str(tmp_path / "a"), "--resume"]) == 0
    history = json.loads((tmp_path / "a/train_backbone.json").read_text())["history"]
    assert len(history) == 2 and 0 <= history[-1]["acc_2500km"] <= 1
    assert all(np.isfinite(h["loss"]) for h in history)

    from geoswc.classifiers import create_backbone

    start = create_backbone("tf_efficientnet_lite0", pretrained=False)
    trained = load_file(str(tmp_path / "a/backbone.safetensors"))
    changed = [
        k
        for k, v in start.state_dict().items()
        if v.is_floating_point() and k in trained and not np.allclose(v.numpy(), trained[k].numpy())
    ]
    assert changed


def test_shards_of_other_cells_are_refused_unless_relabelled(world, tmp_path):
    from geoswc.geocells import S2Partitioner

    from geoswc.data.metadata import read_metadata

    meta = read_metadata(world / "train.csv")
    other = (
        S2Partitioner(min_images=3, max_images=(30, 12))
        .fit(meta["LAT"].to_numpy(), meta["LON"].to_numpy())
        .geocells_
    )
    other.save(tmp_path / "cells")
    rc = train_main(
        [
            "features",
            "--cells",
            str(tmp_path / "cells"),
            "--shards",
            str(world / "shards"),
            "--out",
            str(tmp_path / "o"),
            *COMMON,
        ]
    )
    assert rc == 2

    # --relabel: the stored labels are ignored and every sample is labelled from its coordinates.
    rc = train_main(
        [
            "features",
            "--cells",
            str(tmp_path / "cells"),
            "--shards",
            str(world / "shards"),
            "--relabel",
            "--out",
            str(tmp_path / "r"),
            *COMMON,
        ]
    )
    assert rc == 0
    rows, _, labels = _cache(tmp_path / "r")
    meta = meta.set_index("IMG_ID")
    ids = sorted(rows, key=rows.get)
    truth = other.assign(meta.loc[ids, "LAT"].to_numpy(), meta.loc[ids, "LON"].to_numpy())
    np.testing.assert_array_equal(labels, truth)


def test_longest_resize_batches_by_shape_equal_single_photos(world, tmp_path):
    """Photos of three aspect ratios in `longest` mode: batched features equal each photo's features alone."""
    import pandas as pd
    import torch

    from geoswc.classifiers import create_backbone
    from geoswc.config import resolve_config
    from geoswc.geocells import Geocells
    from geoswc.train.sources import Batches, PhotoTable, build_image_transform

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    shapes = [(40, 30), (30, 40), (36, 36), (40, 30), (30, 40), (40, 30), (36, 36)]
    for i, (w, h) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    pd.DataFrame(
        {"IMG_ID": [f"{i}.png" for i in range(len(shapes))], "AUTHOR": "a", "LAT": 10.0, "LON": 20.0}
    ).to_csv(tmp_path / "m.csv", index=False)
    cfg = resolve_config("tiny", None, ["data.image_size=32", "data.eval_resize=longest"])
    torch.manual_seed(0)
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False).eval()
    transform = build_image_transform(backbone, cfg.data, train=False)
    table = PhotoTable(tmp_path / "m.csv", images, Geocells.load(world / "cells"), transform)
    reader = Batches(table)
    with torch.no_grad():
        batched, groups = {}, []
        for row, inputs, _, _ in reader.iterate_eval(np.arange(len(shapes)), 2, torch.device("cpu")):
            groups.append((row.tolist(), tuple(inputs.shape[2:])))
            for r, f in zip(row.tolist(), backbone(inputs)):
                batched[r] = f
    # Batches of at most two photos of one shape; every photo once.
    assert sorted(r for rows, _ in groups for r in rows) == list(range(len(shapes)))
    resized = {(40, 30): (24, 32), (30, 40): (32, 24), (36, 36): (32, 32)}  # (h, w), longest side 32
    assert all(len(rows) <= 2 and {resized[shapes[r]] for r in rows} == {shape} for rows, shape in groups)
    with torch.no_grad():
        for i in range(len(shapes)):
            alone = backbone(transform(Image.open(images / f"{i}.png").convert("RGB"))[None])[0]
            torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-5)
