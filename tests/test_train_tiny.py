import json

import numpy as np
import pytest

from geoswc.cli import main as cli_main
from geoswc.eval import accuracy_at


def train_main(argv):
    return cli_main(["train", *argv])


@pytest.mark.slow
def test_tiny_preset_learns_on_the_synthetic_world(tmp_path):
    """Tiny preset (ImageNet lite0 from the offline package, 64 px): features + heads beat the majority cell."""
    from geoswc.config import load_preset
    from geoswc.data.synth import make_world
    from geoswc.geocells import S2Partitioner

    make_world(tmp_path, n_train=600, n_test=150, seed=0, image_size=64, progress=False)
    train = np.loadtxt(tmp_path / "train.csv", delimiter=",", skiprows=1, usecols=(2, 3))
    test = np.loadtxt(tmp_path / "test.csv", delimiter=",", skiprows=1, usecols=(2, 3))
    cc = load_preset("tiny").cells
    cells = S2Partitioner(min_images=cc.min_images, max_images=cc.max_images).fit(train[:, 0], train[:, 1])
    cells.geocells_.save(tmp_path / "cells")
    common = ["--cells", str(tmp_path / "cells"), "--preset", "tiny", "--cpu"]
    for split in ("train", "test"):
        assert (
            train_main(
                [
                    "features",
                    *common,
                    "--csv",
                    str(tmp_path / f"{split}.csv"),
                    "--images",
                    str(tmp_path / "images"),
                    "--out",
                    str(tmp_path / f"f_{split}"),
                ]
            )
            == 0
        )
    assert (
        train_main(
            [
                "heads",
                *common,
                "--features",
                str(tmp_path / "f_train"),
                "--val-features",
                str(tmp_path / "f_test"),
                "--out",
                str(tmp_path / "heads"),
                "--kinds",
                "ce",
                "mvmf",
            ]
        )
        == 0
    )
    fine = cells.geocells_.fine
    labels = np.load(tmp_path / "f_train" / "labels.npy")[:, -1]
    majority = np.bincount(labels[labels >= 0], minlength=len(fine)).argmax()
    baseline = accuracy_at(np.repeat(fine.centers_deg[majority][None], len(test), 0), test)["acc_2500km"]
    summary = json.loads((tmp_path / "heads" / "train_heads.json").read_text())["heads"]
    for kind in ("ce", "mvmf"):
        learned = summary[kind]["history"][-1]["acc_2500km"]
        assert learned >= baseline + 0.25, (kind, learned, baseline)
