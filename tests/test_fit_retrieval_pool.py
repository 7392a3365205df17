"""`geoswc fit` with ``backbone.pool: gem|netvlad``: the retrieval module and the background index work on the
layer's descriptors, the heads on average pooling, and the model folder embeds photos at inference exactly as
the features stage embedded them for training."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from geoswc.cli import main
from geoswc.config import resolve_config
from geoswc.data.synth import make_world
from geoswc.train.fit import FitRun, _stage_config, _stage_inputs

FAST = [
    "cells.min_images=5",
    "cells.max_images=[200, 80, 30]",
    "data.image_size=64",
    "backbone.pretrained=false",
    "backbone.epochs=1",
    "backbone.batch_size=32",
    "heads.epochs=1",
    "heads.batch_size=64",
    "retrieval.epochs=2",
    "retrieval.hidden_dim=64",
    "retrieval.memory_size=128",
    "retrieval.background=all",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(out, n_train=160, n_test=20, seed=5, progress=False, workers=1)
    return out


def test_pool_is_left_out_of_the_backbone_key_and_in_the_features_inputs(world, tmp_path):
    def run(pool):
        config = resolve_config("tiny", None, [f"backbone.pool={pool}"])
        return FitRun(
            model_dir=tmp_path, config=config, train_csv=world / "train.csv", images=world / "images"
        )

    avg, gem, netvlad = run("avg"), run("gem"), run("netvlad")
    assert (
        _stage_config(avg, "backbone") == _stage_config(gem, "backbone") == _stage_config(netvlad, "backbone")
    )
    assert _stage_config(avg, "backbone")["backbone"]["pool"] == "avg"
    assert "retrieval_pool" not in _stage_inputs(avg, "features")
    assert _stage_inputs(gem, "features")["retrieval_pool"] == {"pool": "gem"}
    assert _stage_inputs(netvlad, "features")["retrieval_pool"] == {"pool": "netvlad", "clusters": 64}


def _rows(model, world, ids):
    pixels = torch.stack([model.load_pixels(world / "images" / i) for i in ids])
    return model.features(pixels)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["gem", "netvlad"])
def test_fit_with_a_retrieval_pool_embeds_at_inference_as_in_training(world, tmp_path, pool):
    from geoswc.geolocator import Geolocator

    model_dir = tmp_path / "model"
    sets = FAST + [f"backbone.pool={pool}", "backbone.clusters=4"]
    argv = ["fit", str(world / "train.csv"), "--images", str(world / "images"), "-o", str(model_dir)]
    assert main(argv + ["--preset", "tiny", "--cpu", *[a for s in sets for a in ("--set", s)]]) == 0
    work = model_dir / "work" / "features"
    meta = json.loads((model_dir / "geolocator.json").read_text())
    assert meta["retrieval_pool"] == pool and "retrieval_pool.safetensors" in meta["sha256"]
    assert json.loads((work / "retrieval" / "meta.json").read_text())["pool"] == pool

    model = Geolocator.from_pretrained(model_dir, device="cpu", runtime="torch", precision_mode="fp32")
    channels = int(model.backbone.num_features)
    width = channels if pool == "gem" else 4 * channels
    assert model.feature_width == channels + width and model.retrieval.dim == width

    ids = (work / "ids.txt").read_text().split()[:6]
    feats = _rows(model, world, ids)
    trained_avg = np.load(work / "features.npy")[:6].astype(np.float32)
    trained_pool = np.load(work / "retrieval" / "features.npy")[:6].astype(np.float32)
    # The cache is float16: equal to its rounding.
    np.testing.assert_allclose(model.head_features(feats).numpy(), trained_avg, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(model.retrieval_features(feats).numpy(), trained_pool, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(trained_pool, axis=1), 1.0, atol=2e-3)
    if pool == "gem":  # GeM of the normalised local descriptors is not the normalised average
        avg = trained_avg / np.linalg.norm(trained_avg, axis=1, keepdims=True)
        assert np.abs(avg - trained_pool).max() > 1e-2

    # Every labelled training photo is in the background (retrieval.background=all): its nearest background
    # photo is itself, found through the inference embedding of the photo against the index the fit built.
    positions = pd.read_csv(world / "train.csv").set_index("IMG_ID")
    in_index = set(str(i) for i in model.index.ids)
    ids = [i for i in (work / "ids.txt").read_text().split() if i in in_index][:6]
    records = model.predict_from_features(_rows(model, world, ids), mode="rrm")
    assert len(records) == 6
    for image_id, record in zip(ids, records):
        assert record["neighbours"][0]["id"] == image_id
        assert record["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=5e-3)
        assert (record["lat"], record["lon"]) == pytest.approx(tuple(positions.loc[image_id, ["LAT", "LON"]]))

    # `geoswc vpr` on the model folder pools with the same layer (not one initialised again).
    from geoswc.street.model import from_folder

    loaded = from_folder(model_dir)
    assert loaded.spec.pool == pool and loaded.spec.trained_aggregation
    with torch.no_grad():
        pixels = torch.stack([model.load_pixels(world / "images" / i) for i in ids])
        torch.testing.assert_close(loaded.net(pixels), model.retrieval_features(model.features(pixels)))

    # `geoswc index build` on the fit's feature cache embeds the cache the module was trained on (the pooled
    # one, which it finds inside) and gives the fit's index; the module without its pool is refused.
    run = model_dir / "work"
    rebuilt = tmp_path / "index"
    argv = ["index", "build", "--features", str(run / "features"), "--cells", str(run / "cells")]
    argv += ["--retrieval", str(run / "retrieval" / "retrieval.safetensors"), "-o", str(rebuilt)]
    assert main(argv + ["--set", "retrieval.background=all", "--dtype", "float32"]) == 0
    fitted = np.load(run / "index" / "embeddings.npy").astype(np.float32)
    np.testing.assert_allclose(np.load(rebuilt / "embeddings.npy"), fitted, atol=2e-3)
    from geoswc.assemble import assemble_model

    # GeM keeps the width, so only the recorded pool tells; NetVLAD's K x C width is refused first.
    refused = (
        "trained on gem-pooled features, but the model pools them by avg" if pool == "gem" else "dim 5120"
    )
    with pytest.raises(ValueError, match=refused):
        assemble_model(
            tmp_path / "no_pool",
            cells=run / "cells",
            backbone=run / "backbone",
            heads=run / "heads" / "heads",
            retrieval=run / "retrieval" / "retrieval.safetensors",
        )

    # The test photos are placed (Search within Cell on the pooled embeddings).
    test_ids = pd.read_csv(world / "test.csv")["IMG_ID"].tolist()[:5]
    placed = model.predict([world / "images" / i for i in test_ids])
    assert all(-90 <= p["lat"] <= 90 and -180 <= p["lon"] <= 180 for p in placed)
    assert any(p["method"] == "swc" for p in placed)


@pytest.mark.slow
def test_features_from_shards_cache_netvlad_descriptors(world, tmp_path):
    """The shard path of the features stage: NetVLAD initialised from the shards' photos, a second cache of
    the same photos, in the same order, of unit descriptors K x C wide."""
    from geoswc.classifiers.aggregation import NetVLAD, load_retrieval_pool

    cells, shards, out = tmp_path / "cells", tmp_path / "shards", tmp_path / "features"
    assert main(["cells", "build", str(world / "train.csv"), "-o", str(cells), "--min-images", "8"]) == 0
    argv = ["data", "shards", str(world / "train.csv"), "--images", str(world / "images"), "-o", str(shards)]
    assert main(argv + ["--cells", str(cells), "--samples-per-shard", "100"]) == 0
    sets = ["data.image_size=64", "backbone.pretrained=false", "backbone.pool=netvlad", "backbone.clusters=2"]
    argv = ["train", "features", "--cells", str(cells), "--shards", str(shards), "--out", str(out), "--cpu"]
    assert main(argv + ["--preset", "tiny", *[a for s in sets for a in ("--set", s)]]) == 0
    layer = load_retrieval_pool(out / "retrieval" / "retrieval_pool.safetensors")
    assert isinstance(layer, NetVLAD) and layer.clusters == 2
    unit = layer.centroids.detach() / layer.centroids.detach().norm(dim=1, keepdim=True)
    weights = layer.assign.weight.detach()[:, :, 0, 0]
    alpha = weights.norm(dim=1)  # initialised: the assignment weights are alpha * unit(centroid)
    assert torch.allclose(alpha, alpha[0].expand_as(alpha), rtol=1e-4)
    assert torch.allclose(weights, alpha[0] * unit, atol=1e-4 * float(alpha[0]))
    pooled = np.load(out / "retrieval" / "features.npy").astype(np.float32)
    assert pooled.shape == (160, 2 * 1280)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=2e-3)
    assert (out / "ids.txt").read_text() == (out / "retrieval" / "ids.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["gem", "netvlad"])
def test_two_pool_backbone_is_the_backbone_then_the_layer_and_exports(pool):
    """One pass, both poolings: the backbone's own output, then what `VPRNet` (the features stage) gives; the
    ONNX Runtime path of `Geolocator.optimize` runs the same module to the same numbers."""
    from geoswc.classifiers.aggregation import TwoPoolBackbone, VPRNet
    from geoswc.classifiers.backbone import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("tf_efficientnet_lite0").eval()
    net = VPRNet(backbone, pool, clusters=3).eval()
    both = TwoPoolBackbone(backbone, net.aggregation).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = both(pixels)
        assert torch.equal(out[:, :1280], backbone(pixels))
        torch.testing.assert_close(out[:, 1280:], net(pixels))
    assert both.num_features == out.shape[1] == 1280 + net.out_dim
    pytest.importorskip("onnxruntime")
    from geoswc.runtime import OnnxForward

    torch.testing.assert_close(OnnxForward(both)(pixels), out, atol=1e-4, rtol=1e-4)
