"""`geoswc assemble` and `geoswc fit --from`: a retrieval variant of a finished run as its own model folder,
without training the backbone or the heads again."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geoswc.cli import main
from geoswc.config import Config
from geoswc.data.synth import make_world
from geoswc.train.fit import STAGES, read_marker

# A random-weight timm test model at 64 px: these tests check the plumbing, not accuracy.
SETS = [
    "cells.min_images=5",
    "cells.max_images=[200, 80, 30]",
    "data.image_size=64",
    "backbone.model=test_efficientnet",
    "backbone.pretrained=false",
    "backbone.weights=null",
    "backbone.epochs=1",
    "heads.epochs=1",
    "retrieval.epochs=2",
    "retrieval.hidden_dim=32",
    "retrieval.memory_size=64",
]
FLAGS = [arg for s in SETS for arg in ("--set", s)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(out, n_train=160, n_test=16, seed=3, progress=False, workers=1)
    return out


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """A finished `geoswc fit` folder (every stage, default retrieval settings)."""
    out = tmp_path_factory.mktemp("run") / "model"
    argv = ["fit", str(world / "train.csv"), "--images", str(world / "images"), "-o", str(out)]
    assert main([*argv, "--preset", "tiny", "--cpu", *FLAGS]) == 0
    return out


def _tensors(path):
    return load_file(str(path))


@pytest.mark.slow
def test_a_retrieval_variant_is_assembled_from_a_run_and_evaluates(world, run, tmp_path, capsys):
    work = run / "work"
    r2, i2, m2 = tmp_path / "R2", tmp_path / "I2", tmp_path / "MODEL2"
    stage = ["--cells", str(work / "cells"), "--features", str(work / "features"), "--preset", "tiny", *FLAGS]
    assert (
        main(["train", "retrieval", *stage, "--set", "retrieval.loss=triplet", "--out", str(r2), "--cpu"])
        == 0
    )
    head = work / "heads" / "heads" / "ce.safetensors"
    argv = ["index", "build", *stage, "--head", str(head), "--retrieval", str(r2 / "retrieval.safetensors")]
    assert main([*argv, "--set", "retrieval.background=all", "-o", str(i2), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert (
        main(["assemble", "--from", str(run), "--retrieval", str(r2), "--index", str(i2), "-o", str(m2)]) == 0
    )
    assert f"model folder {m2}" in capsys.readouterr().out

    # The backbone is the run's, byte for byte, and so are the heads' weights; the retrieval weights are the
    # variant's.
    assert (m2 / "backbone.safetensors").read_bytes() == (run / "backbone.safetensors").read_bytes()
    assert (m2 / "backbone.safetensors").read_bytes() == (
        work / "backbone" / "backbone.safetensors"
    ).read_bytes()
    for kind in ("ce", "hc", "mvmf"):
        ours, theirs = (
            _tensors(m2 / "heads" / f"{kind}.safetensors"),
            _tensors(run / "heads" / f"{kind}.safetensors"),
        )
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    base, variant = _tensors(run / "retrieval.safetensors"), _tensors(m2 / "retrieval.safetensors")
    assert base.keys() == variant.keys()
    assert not all(torch.equal(base[k], variant[k]) for k in base)
    assert torch.equal(variant["fc1.weight"], _tensors(r2 / "retrieval.safetensors")["fc1.weight"])

    # Its configuration says how each part was made: the run's, the variant's loss and background.
    config, run_config = Config.load(m2 / "config.yaml"), Config.load(run / "config.yaml")
    assert (config.retrieval.loss, config.retrieval.background) == ("triplet", "all")
    assert (run_config.retrieval.loss, run_config.retrieval.background) == ("infonce", "placeable")
    assert (config.backbone, config.heads, config.swc) == (
        run_config.backbone,
        run_config.heads,
        run_config.swc,
    )
    # background=all: every training photo with a fine cell is in the index.
    labels = np.load(work / "features" / "labels.npy")[:, -1]
    assert json.loads((m2 / "assembly.json").read_text())["index_photos"] == int((labels >= 0).sum())
    parts = json.loads((m2 / "assembly.json").read_text())["parts"]
    assert parts["backbone"] == str((work / "backbone").resolve())
    assert parts["retrieval"] == str((r2 / "retrieval.safetensors").resolve())

    out = tmp_path / "eval"
    code = main(
        ["evaluate", "--model", str(m2), "--meta", str(world / "test.csv"), "--images", str(world / "images")]
        + ["-o", str(out), "--device", "cpu", "--workers", "0"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert "ce+rrm" in json.dumps(results) and "rrm" in json.dumps(results)


@pytest.mark.slow
def test_fit_from_links_the_stages_it_shares_and_trains_only_the_rest(world, run, tmp_path, capsys):
    from geoswc.geolocator import Geolocator
    from geoswc.retrieval import IdentityEmbedding

    before = {stage: read_marker(run / "work" / stage) for stage in STAGES}
    m3 = tmp_path / "MODEL3"
    argv = [
        "fit",
        str(world / "train.csv"),
        "--images",
        str(world / "images"),
        "-o",
        str(m3),
        "--from",
        str(run),
    ]
    assert main([*argv, "--preset", "tiny", "--cpu", *FLAGS, "--set", "retrieval.loss=none"]) == 0
    printed = capsys.readouterr().out
    for number, stage in enumerate(STAGES, 1):
        reused = f"[{number}/{len(STAGES)}] {stage}: reused" in printed
        assert reused == (stage in ("data", "cells", "backbone", "features", "heads")), stage
    assert (m3 / "work" / "backbone").is_symlink()
    assert (m3 / "work" / "backbone").resolve() == (run / "work" / "backbone").resolve()
    assert not (m3 / "work" / "retrieval").is_symlink()
    assert (m3 / "backbone.safetensors").read_bytes() == (run / "backbone.safetensors").read_bytes()
    # The run itself is untouched.
    assert {stage: read_marker(run / "work" / stage) for stage in STAGES} == before

    # retrieval.loss=none: the embed step is the identity (L2-normalised features), the index holds features.
    model = Geolocator.from_pretrained(m3, device="cpu")
    assert isinstance(model.retrieval, IdentityEmbedding)
    features = torch.randn(3, model.retrieval.dim)
    torch.testing.assert_close(model.embed(features), features / features.norm(dim=1, keepdim=True))
    cache = np.load(run / "work" / "features" / "features.npy").astype(np.float32)
    ids = (run / "work" / "features" / "ids.txt").read_text().split()
    row = {i: n for n, i in enumerate(ids)}
    expected = cache[[row[str(i)] for i in model.index.ids]]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(model.index.embeddings, np.float32), expected, atol=2e-3)

    # Rerun with the run's own settings: the retrieval stage is linked from the run, replacing the variant's.
    assert main([*argv, "--preset", "tiny", "--cpu", *FLAGS]) == 0
    assert "retrieval: reused" in capsys.readouterr().out
    ours, theirs = _tensors(m3 / "retrieval.safetensors"), _tensors(run / "retrieval.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_assemble_refuses_a_non_empty_folder_and_a_missing_run(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["assemble", "--from", str(tiny_model_dir), "-o", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["assemble", "--from", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["assemble", "--from", str(tiny_model_dir), "-o", str(tiny_model_dir), "--overwrite"]) == 2
    assert "holds the cells part being read" in capsys.readouterr().err
    assert main(["assemble", "-o", str(tmp_path / "y")]) == 2
    assert "give --cells or --from RUN" in capsys.readouterr().err


def test_assemble_from_a_model_folder_copies_it_and_can_drop_retrieval(tmp_path, tiny_model_dir):
    from geoswc.geolocator import Geolocator

    assert (
        main(["assemble", "--from", str(tiny_model_dir), "-o", str(tmp_path / "same"), "--set", "swc.k=3"])
        == 0
    )
    for part in ("backbone.safetensors", "backbone.json", "index/embeddings.npy", "index/offsets.npy"):
        assert (tmp_path / "same" / part).read_bytes() == (tiny_model_dir / part).read_bytes(), part
    for part in ("retrieval.safetensors", "heads/hc.safetensors"):
        ours, theirs = _tensors(tmp_path / "same" / part), _tensors(tiny_model_dir / part)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert Geolocator.from_pretrained(tmp_path / "same", device="cpu").config.swc.k == 3
    assert (
        main(["assemble", "--from", str(tiny_model_dir), "--no-retrieval", "-o", str(tmp_path / "cls")]) == 0
    )
    model = Geolocator.from_pretrained(tmp_path / "cls", device="cpu")
    assert model.retrieval is None and model.index is None and sorted(model.heads) == ["ce", "hc", "mvmf"]
