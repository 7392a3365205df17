import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from geoswc.data.images import image_path
from geoswc.data.loading import expand_urls, shard_loader
from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.data.metadata import read_metadata
from geoswc.data.shards import write_shards
from geoswc.data.synth import make_world
from geoswc.data.transforms import build_transform, pad_collate
from conftest import two_rank_launch

CONFIG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """7 uneven shards (23 samples each, 19 in the last): 157 photos."""
    root = tmp_path_factory.mktemp("loading")
    make_world(root / "world", n_train=157, n_test=12, seed=9, progress=False)
    labeler = lambda lat, lon: np.stack([(lat > 0), (lon > 0)], axis=1).astype(np.int64)  # noqa: E731
    write_shards(
        read_metadata(root / "world" / "train.csv"),
        root / "shards",
        images_root=root / "world" / "images",
        labeler=labeler,
        fingerprint="quadrants",
        samples_per_shard=23,
        progress=False,
    )
    return root


def _ids(loader):
    return [i for batch in loader for i in batch["id"]]


def test_a_folder_a_brace_pattern_and_a_glob_name_the_same_shards(shards):
    folder = expand_urls(shards / "shards")
    assert len(folder) == 7
    assert expand_urls(str(shards / "shards" / "*.tar")) == folder
    assert expand_urls(str(shards / "shards" / "00000{0..6}-000.tar")) == folder
    assert expand_urls(str(shards / "shards" / "{000000,000001}-*.tar")) == folder[:2]
    assert expand_urls(str(shards / "nowhere" / "*.tar")) == []


def test_batches_have_the_documented_shapes(shards):
    transform = build_transform(CONFIG, train=True, size=64)
    batch = next(iter(shard_loader(shards / "shards", transform=transform, batch_size=10)))
    assert batch["image"].shape == (10, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["latlon"].shape == (10, 2) and batch["latlon"].dtype == torch.float64
    assert batch["labels"].dtype == torch.int64
    truth = read_metadata(shards / "world" / "train.csv").set_index("IMG_ID")
    lat = truth.loc[batch["id"], "LAT"].to_numpy()
    assert torch.equal(batch["latlon"][:, 0], torch.tensor(lat, dtype=torch.float64))
    assert batch["labels"][:, 0].tolist() == (lat > 0).astype(int).tolist()


@pytest.mark.parametrize("world_size,workers", [(2, 3), (3, 2), (2, 0)])
def test_every_sample_exactly_once_across_ranks_and_workers(shards, world_size, workers):
    transform = build_transform(CONFIG, train=False, size=32, eval_resize="fixed")
    seen = []
    sizes = []
    for rank in range(world_size):
        ids = _ids(
            shard_loader(
                shards / "shards",
                transform=transform,
                batch_size=8,
                num_workers=workers,
                rank=rank,
                world_size=world_size,
                shuffle_buffer=16,
                seed=1,
                epoch=2,
            )
        )
        seen += ids
        sizes.append(len(ids))
    expected = read_metadata(shards / "world" / "train.csv")["IMG_ID"].tolist()
    assert sorted(seen) == sorted(expected)
    assert max(sizes) - min(sizes) <= 1  # ranks get equal shares


@pytest.mark.slow
def test_shuffle_is_deterministic_per_seed_and_epoch(shards):
    transform = build_transform(CONFIG, train=False, size=32, eval_resize="fixed")

    def order(seed, epoch):
        return _ids(
            shard_loader(
                shards / "shards",
                transform=transform,
                batch_size=16,
                shuffle_buffer=30,
                seed=seed,
                epoch=epoch,
            )
        )

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(1, 0))
    unshuffled = _ids(shard_loader(shards / "shards", transform=transform, batch_size=16))
    assert unshuffled == read_metadata(shards / "world" / "train.csv")["IMG_ID"].tolist()


def test_epoch_length_gives_exact_batches_per_rank(shards):
    transform = build_transform(CONFIG, train=True, size=32)
    for rank in range(2):
        loader = shard_loader(
            shards / "shards",
            transform=transform,
            batch_size=16,
            num_workers=2,
            rank=rank,
            world_size=2,
            epoch_length=13,
            shuffle_buffer=20,
        )
        batches = list(loader)
        assert len(batches) == 13 and all(len(b["id"]) == 16 for b in batches)  # 208 > 79 per rank: resampled


def test_photo_dataset_of_an_evaluation_folder_reports_missing_and_unreadable(shards, tmp_path):
    meta = read_metadata(shards / "world" / "test.csv")
    meta.loc[len(meta)] = ["00/00/404.jpg", "x@N00", 0.0, 0.0]
    (shards / "world" / "images" / "00" / "01").mkdir(parents=True, exist_ok=True)
    (shards / "world" / "images" / "00" / "01" / "500.jpg").write_bytes(b"broken")
    meta.loc[len(meta)] = ["00/01/500.jpg", "y@N00", 0.0, 0.0]
    dataset = PhotoDataset(
        [image_path(shards / "world" / "images", i) for i in meta["IMG_ID"]],
        build_transform(CONFIG, train=False, size=64, eval_resize="longest"),
    )
    assert len(dataset) == 14
    batches = list(photo_batches(dataset, batch_size=5))
    errors = {i: e for b in batches for i, e in b.errors.items()}
    assert errors.keys() == {12, 13}
    assert errors[12] == "file not found" and "not a recognised image" in errors[13]
    placed = [b for b in batches if len(b)]
    assert sorted(i for b in placed for i in b.indices.tolist()) == list(range(12))
    assert {tuple(b.pixels.shape[1:]) for b in placed} == {(3, 48, 64)}  # 128x96 photos, longest side 64


def test_transforms_follow_the_paper_and_timm_config():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    config = timm.data.resolve_model_data_config(model)
    mean = tuple(int(round(m * 255)) for m in config["mean"])
    photo = Image.new("RGB", (500, 375), mean)
    assert build_transform(config, train=False, size=300)(photo).shape == (3, 225, 300)
    assert build_transform(config, train=False, size=300, eval_resize="fixed")(photo).shape == (3, 300, 300)
    train = build_transform(config, train=True)
    out = train(photo)
    assert out.shape == (3, 300, 300) and out.abs().max() < 0.02  # mean colour normalises to zero
    crop = train.transforms[0]
    assert crop.scale == (0.7, 1.0) and crop.ratio == pytest.approx((0.75, 4 / 3))
    # A left-to-right ramp comes out reversed about half the time (flip, p = 0.5), and its visible range
    # spans >= sqrt(0.7 * 3/4) of the width (a crop keeps >= 70 % of the area at aspect <= 4/3).
    small = build_transform(config, train=True, size=32)
    ramp = Image.fromarray(np.tile((np.arange(500) // 2).astype(np.uint8)[None, :, None], (375, 1, 3)))
    flipped, spans = 0, []
    for _ in range(40):
        row = small(ramp)[0, 16] * config["std"][0] + config["mean"][0]
        flipped += bool(row[0] > row[-1])
        spans.append(float((row.max() - row.min()) * 255 / 249.5))
    assert 5 < flipped < 35
    assert min(spans) > np.sqrt(0.7 * 0.75) - 0.05
    with pytest.raises(ValueError, match="choose one of: longest, fixed"):
        build_transform(config, train=False, eval_resize="square")


def test_pad_collate_pads_to_a_fixed_canvas():
    samples = [
        {"image": torch.ones(3, 30, 40), "id": "a", "latlon": (1.0, 2.0)},
        {"image": torch.ones(3, 40, 25), "id": "b", "latlon": (3.0, 4.0)},
    ]
    batch = pad_collate(samples, canvas=40)
    assert batch["image"].shape == (2, 3, 40, 40)
    assert batch["image"][0, :, :30, :40].eq(1).all() and batch["image"][0, :, 30:].eq(0).all()
    assert batch["image"][1, :, :, 25:].eq(0).all()
    assert batch["image_size"].tolist() == [[30, 40], [40, 25]]
    assert batch["id"] == ["a", "b"] and batch["latlon"].dtype == torch.float64
    with pytest.raises(ValueError, match="does not fit"):
        pad_collate(samples, canvas=32)


DIST_SCRIPT = """
import sys
from accelerate import Accelerator
from geoswc.data.loading import shard_loader
from geoswc.data.transforms import build_transform

shards, out = sys.argv[1], sys.argv[2]
accelerator = Accelerator()
transform = build_transform({"mean": (0.5,) * 3, "std": (0.5,) * 3}, train=True, size=32)
for epoch in range(2):
    loader = shard_loader(shards, transform=transform, batch_size=8, num_workers=2, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, shuffle_buffer=16, seed=3, epoch=epoch)
    with open(f"{out}/ids_rank{accelerator.process_index}_epoch{epoch}.txt", "w") as f:
        for batch in loader:
            f.write("".join(i + "\\n" for i in batch["id"]))
assert accelerator.num_processes == 2
accelerator.wait_for_everyone()
"""


@pytest.mark.slow
def test_two_real_ranks_see_every_sample_exactly_once(shards, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    # Without CUDA, accelerate only forms a process group on CPU (gloo) when told to use the CPU.
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    result = subprocess.run(
        [
            *two_rank_launch(),
            str(script),
            str(shards / "shards"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sorted(read_metadata(shards / "world" / "train.csv")["IMG_ID"])
    orders = []
    for epoch in range(2):
        per_rank = [(tmp_path / f"ids_rank{r}_epoch{epoch}.txt").read_text().split() for r in range(2)]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == expected
        orders.append(per_rank[0])
    assert orders[0] != orders[1]  # each epoch reshuffles
