"""`geoswc import visloc` against hostile and damaged inputs: each case is refused in one line naming the file,
before anything is written, and a replaced model folder is swapped in only once the new one is complete.

The release is written in the authors' formats (efficientnet_pytorch's B4 state dict, their head tensor names,
their HDF5 and pickle layouts) with random weights and a small background.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from geoswc.cli import main

h5py = pytest.importorskip("h5py")

DIM = 1792  # EfficientNet-B4's feature width
N_COMPONENTS = 6
N_ROWS = 30
ROLES = ("backbone", "mvmf", "rrm", "background", "assignments")
NAMES = {
    "backbone": "efficientnet_backbone.pt",
    "mvmf": "mvmf_head.pt",
    "rrm": "rrm_head.pt",
    "background": "back_coll_features.hdf5",
    "assignments": "cells_assignments.pkl",
}


def _write_release(root: Path, backbone: Path) -> SimpleNamespace:
    """The authors' five files in ``root`` (the backbone linked from ``backbone``), 30 background rows over 6
    components."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    (root / NAMES["backbone"]).symlink_to(backbone)
    mus = np.stack([np.linspace(-40, 50, N_COMPONENTS), np.linspace(-150, 160, N_COMPONENTS)])
    mvmf = {
        "mvmf.mus": torch.tensor(mus),
        "mvmf.kappas": torch.zeros(N_COMPONENTS, dtype=torch.double),
        "mixture_weights.seq_model.0.weight": torch.randn(N_COMPONENTS, DIM, generator=gen) * 0.01,
        "mixture_weights.seq_model.0.bias": torch.zeros(N_COMPONENTS),
    }
    torch.save(mvmf, root / NAMES["mvmf"])
    hidden = 16
    rrm = {
        "norm.weight": torch.ones(DIM),
        "norm.bias": torch.zeros(DIM),
        "res.fc1.weight": torch.randn(hidden, DIM, generator=gen) * 0.01,
        "res.fc1.bias": torch.zeros(hidden),
        "res.fc2.weight": torch.randn(DIM, hidden, generator=gen) * 0.01,
        "res.fc2.bias": torch.zeros(DIM),
        "res.norm.weight": torch.ones(DIM),
        "res.norm.bias": torch.zeros(DIM),
    }
    torch.save(rrm, root / NAMES["rrm"])
    embeddings = rng.normal(size=(N_ROWS, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.stack([rng.uniform(-60, 60, N_ROWS), rng.uniform(-170, 170, N_ROWS)], axis=1)
    write_background(root / NAMES["background"], features=embeddings, labels=labels)
    assignments = {c: set(range(c, N_ROWS, N_COMPONENTS)) for c in range(N_COMPONENTS)}
    write_assignments(root / NAMES["assignments"], assignments)
    return SimpleNamespace(root=root, embeddings=embeddings, labels=labels, assignments=assignments)


def write_background(path: Path, **datasets) -> None:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)


def write_assignments(path: Path, assignments) -> None:
    path.write_bytes(pickle.dumps(assignments, protocol=4))


def import_args(root: Path, out: Path, *extra: str):
    args = ["import", "visloc", "-q", "-o", str(out), *extra]
    for role in ROLES:
        args += [f"--{role}", str(root / NAMES[role])]
    return args


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    """efficientnet_pytorch's own B4 (random weights) as the authors save it: a state dict."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    model = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4", include_top=False)
    path = tmp_path_factory.mktemp("backbone") / NAMES["backbone"]
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def release(tmp_path, backbone_file) -> SimpleNamespace:
    return _write_release(tmp_path / "release", backbone_file)


@pytest.fixture
def dummy_release(tmp_path) -> SimpleNamespace:
    """The release with a backbone file that is never read (the cases below are refused before it is)."""
    dummy = tmp_path / "unread_backbone.pt"
    dummy.write_bytes(b"never read: the inputs are refused before the backbone is converted")
    return _write_release(tmp_path / "release", dummy)


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------- replacing a model folder
@pytest.mark.slow
def test_a_failed_overwrite_keeps_the_previous_model_and_a_good_one_swaps_it_in(release, tmp_path, capsys):
    from geoswc.geolocator import Geolocator

    out = tmp_path / "models" / "visloc"
    assert main(import_args(release.root, out)) == 0
    before = {p.relative_to(out): _sha(p) for p in out.rglob("*") if p.is_file()}

    # A NaN in the background is found while the new model is built: the previous model stays, whole.
    with h5py.File(release.root / NAMES["background"], "r+") as f:
        f["features"][7, 3] = np.nan
    capsys.readouterr()
    assert main(import_args(release.root, out, "--overwrite")) == 2
    _one_line_error(capsys, str(release.root / NAMES["background"]), "row 7", "NaN")
    assert {p.relative_to(out): _sha(p) for p in out.rglob("*") if p.is_file()} == before
    assert _leftovers(out.parent) == []
    Geolocator.from_pretrained(out, device="cpu")

    # A good import replaces it: fewer background rows, and nothing left beside it.
    with h5py.File(release.root / NAMES["background"], "r+") as f:
        f["features"][7, 3] = 0.0
    write_assignments(release.root / NAMES["assignments"], {0: {0, 1}, 4: {2}})
    assert main(import_args(release.root, out, "--overwrite")) == 0
    assert len(Geolocator.from_pretrained(out, device="cpu").index) == 3
    assert _leftovers(out.parent) == []


@pytest.mark.slow
def test_overwrite_refuses_a_folder_that_is_not_a_model_folder(release, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.docx").write_bytes(b"four years of work")
    assert main(import_args(release.root, thesis, "--overwrite")) == 2
    _one_line_error(capsys, str(thesis), "not a geoswc model folder", "thesis.docx")
    assert (thesis / "thesis.docx").read_bytes() == b"four years of work"
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.docx"]
    assert _leftovers(tmp_path) == []


def test_a_link_is_never_replaced(dummy_release, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "geolocator.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(import_args(dummy_release.root, link, "--overwrite")) == 2
    _one_line_error(capsys, str(link), "symbolic link")
    assert (real / "geolocator.json").read_text() == "{}"


# ------------------------------------------------------------------------------- the background file
@pytest.mark.slow
def test_a_small_file_declaring_a_billion_rows_is_refused_before_it_is_read(release, tmp_path):
    with h5py.File(release.root / NAMES["background"], "w") as f:
        f.create_dataset("labels", shape=(10**9, 2), dtype="f8")
        f.create_dataset("features", shape=(10**9, DIM), dtype="f4")
    assert (release.root / NAMES["background"]).stat().st_size < 10_000
    # Run with 6 GiB of address space: reading the declared labels alone would take 14.9 GiB.
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
        "from geoswc.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = import_args(release.root, tmp_path / "model")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(release.root / NAMES["background"]) in lines[0], done.stderr[-2000:]
    assert "declares shape (1000000000, 2)" in lines[0]
    assert not (tmp_path / "model").exists()


BAD_BACKGROUNDS = {
    "labels (N, 3)": (lambda r: {"labels": np.zeros((N_ROWS, 3))}, "labels (30, 3)"),
    "3-D features": (lambda r: {"features": np.zeros((N_ROWS, 4, DIM // 4), "f4")}, "features (30, 4, 448)"),
    "string features": (lambda r: {"features": np.array([b"row"] * N_ROWS)}, "features are |S3"),
    "complex features": (lambda r: {"features": r.embeddings.astype(np.complex64)}, "features are complex64"),
    "int8 features": (lambda r: {"features": (r.embeddings * 100).astype(np.int8)}, "features are int8"),
    "no labels": (lambda r: {"labels": None}, "no dataset 'labels'"),
    "labels out of range": (
        lambda r: {"labels": np.concatenate([r.labels[:5], [[91.0, 0.0]], r.labels[6:]])},
        "labels row 5 has latitude 91.0",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_BACKGROUNDS))
def test_a_background_of_the_wrong_shape_or_type_is_one_line_naming_it(release, tmp_path, capsys, case):
    make, needle = BAD_BACKGROUNDS[case]
    replace = make(release)
    path = release.root / NAMES["background"]
    with h5py.File(path, "r+") as f:
        for name, data in replace.items():
            del f[name]
            if data is not None:
                f.create_dataset(name, data=data)
    assert main(import_args(release.root, tmp_path / "model")) == 2
    _one_line_error(capsys, str(path), needle)
    assert not (tmp_path / "model").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- the assignments pickle
BAD_ASSIGNMENTS = {
    "None row": ({0: {None, 1}}, "component 0 lists None"),
    "2**80 row": ({0: {2**80}}, f"component 0 lists row {2**80}"),
    "float row": ({0: {1.7, 2}}, "component 0 lists 1.7 (float)"),
    "NaN row": ({0: {float("nan")}}, "component 0 lists nan (float)"),
    "text row": ({0: {"x"}}, "component 0 lists 'x' (str)"),
    "empty dict": ({}, "assigns no background row"),
    "numpy float row": ({0: {np.float64(3.0)}}, "component 0 lists 3.0 (float64)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_ASSIGNMENTS))
def test_assignments_that_are_not_row_numbers_are_one_line_naming_the_file(release, tmp_path, capsys, case):
    value, needle = BAD_ASSIGNMENTS[case]
    path = release.root / NAMES["assignments"]
    write_assignments(path, value)
    assert main(import_args(release.root, tmp_path / "model")) == 2
    _one_line_error(capsys, str(path), needle)
    assert not (tmp_path / "model").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- fast, without a backbone
def test_the_background_reader_checks_declared_sizes_against_stored_bytes(tmp_path):
    from geoswc.importers.background import BackgroundFile

    path = tmp_path / "b.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.zeros((100, 2)))
        # Chunked, compressed: 100 rows stored in 10 chunks, then a shape that declares 10x more chunks.
        f.create_dataset("features", data=np.ones((100, 8), "f4"), chunks=(10, 8), compression="gzip")
    with BackgroundFile(path) as bg:
        assert (bg.n_rows, bg.dim, bg.transposed) == (100, 8, False)
        assert np.array_equal(bg.labels(np.array([3, 3, 99])), np.zeros((3, 2)))
        blocks = list(bg.feature_blocks())
        assert sum(len(b) for _, b in blocks) == 100
    with h5py.File(path, "r+") as f:
        del f["labels"], f["features"]
        f.create_dataset("labels", data=np.zeros((1000, 2)))
        f.create_dataset("features", shape=(1000, 8), dtype="f4", chunks=(10, 8), compression="gzip")
        f["features"][:100] = 1.0
    with pytest.raises(
        ValueError, match=r"'features' declares shape \(1000, 8\) in 100 chunks but the file stores 10"
    ):
        BackgroundFile(path)


def test_a_pt_file_that_asks_to_run_code_is_refused_without_torchs_advice(dummy_release, tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    path = dummy_release.root / NAMES["mvmf"]
    torch.save({"mvmf.mus": RunsCode()}, path)
    assert main(import_args(dummy_release.root, tmp_path / "model")) == 2
    err = _one_line_error(capsys, str(path), "refused", "system")
    assert "weights_only" not in err.replace("weights_only=True", "") and "will likely succeed" not in err
    assert "False" not in err


def test_assignment_pairs_refuses_rows_that_are_not_integers_in_range():
    from geoswc.importers.visloc import assignment_pairs

    comps, rows = assignment_pairs({2: [5, 1], 0: (np.int64(3),)}, n_components=3, n_rows=6, source="a.pkl")
    assert comps.tolist() == [0, 2, 2] and rows.tolist() == [3, 1, 5]
    for bad, needle in (
        (True, "lists True (bool)"),
        (6, "lists row 6"),
        (-1, "lists row -1"),
        (2.0, "2.0 (float)"),
    ):
        with pytest.raises(ValueError, match=r"^a\.pkl: component 1 ") as err:
            assignment_pairs({1: {bad}}, n_components=3, n_rows=6, source="a.pkl")
        assert needle in str(err.value)
