"""`geoswc import visloc`: the ICMR 2021 authors' release, in their formats, becomes a geoswc model folder.

The files are written here in the authors' formats with random weights: the backbone is efficientnet_pytorch's
own B4 (``EfficientNet.from_name``, no download) and the heads are state dicts with the tensor names of their
``src/modules.py``. The references are efficientnet_pytorch itself (pooled features), a hand computation from the
saved tensors (component, prediction density), hashlib (provenance) and, in the tests marked ``shared``, the
authors' own code from ``../shared/reference/peers/visloc-estimation`` run as the oracle.
"""

from __future__ import annotations

import hashlib
import http.server
import math
import pickle
import sys
import threading
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from haversine import Unit, haversine_vector
from PIL import Image, ImageDraw, ImageFilter

from geoswc.cli import main

efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
h5py = pytest.importorskip("h5py")

DIM = 1792
N_COMPONENTS = 40
N_PHOTOS = 8
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _their_backbone(seed: int) -> torch.nn.Module:
    """efficientnet_pytorch's B4 with random weights that make it a smooth function of the photo, as a trained
    network is: convolutions initialised for unit gain (the default initialisation gives the same features for
    every input, and He's makes a random network so chaotic that a grey level changes its output), BatchNorm
    statistics that are not the defaults, and a last BatchNorm that brings the pooled features to order 1, the
    scale at which an absolute tolerance of 1e-4 means what it says."""
    torch.manual_seed(seed)
    model = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4", include_top=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1e-6, 1e-6)
                module.running_var.uniform_(0.8, 1.2)
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-1e-6, 1e-6)
        model._bn1.weight.mul_(3e3)
    return model


def _their_transform():
    """Their Preprocessing("inference", backbone="efficientnet") (src/utils.py), written with torchvision."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(300), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _photos(folder: Path, rng: np.random.Generator) -> list:
    """Synthetic photos of mixed orientation and size: smooth colour fields with shapes, saved as JPEG."""
    folder.mkdir()
    sizes = [(480, 360), (360, 480), (400, 300), (512, 384), (375, 500)]
    paths = []
    for i in range(N_PHOTOS):
        width, height = sizes[i % len(sizes)]
        coarse = rng.uniform(0, 255, size=(4, 5, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, width - 60), rng.integers(0, height - 60)
            w, h = rng.integers(20, 120, size=2)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
        path = folder / f"photo_{i:02d}.jpg"
        image.filter(ImageFilter.GaussianBlur(1.5)).save(path, quality=92)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The five files in the authors' formats, the photos, and what their backbone computes on the photos."""
    root = tmp_path_factory.mktemp("visloc")
    rng = np.random.default_rng(7)
    backbone = _their_backbone(seed=3)
    photos = _photos(root / "photos", rng)
    transform = _their_transform()
    tensors = [transform(Image.open(p).convert("RGB")) for p in photos]
    with torch.no_grad():
        features = torch.stack([backbone(t[None]).flatten(1)[0] for t in tensors])

    # MvMF head (their MVMFModule state dict): means in degrees, two of them outside the usual ranges as
    # training can leave them. The mixture layer has one component tuned to each photo (its weights point
    # along the photo's centred feature), as a trained head has a clear favourite for a clear photo, and
    # random weights for the others; every fourth component has no background photo (Search within Cell
    # falls back for the photos it wins).
    mus = np.stack([rng.uniform(-55, 65, N_COMPONENTS), rng.uniform(-179, 179, N_COMPONENTS)])
    mus[:, 3] = [95.0, 10.0]  # the point (85, -170)
    mus[:, 5] = [12.0, 200.0]  # the point (12, -160)
    centred = features - features.mean(0)
    scale = centred.norm(dim=1).mean()
    weight = torch.randn(N_COMPONENTS, DIM) * (2.0 / scale / math.sqrt(DIM))
    weight[:N_PHOTOS] = 10.0 * centred / centred.norm(dim=1, keepdim=True) ** 2
    bias = -(weight @ features.mean(0))
    mvmf = {
        "mvmf.mus": torch.tensor(mus, dtype=torch.double),
        "mvmf.kappas": torch.tensor(rng.normal(0, 1, N_COMPONENTS), dtype=torch.double),
        "mixture_weights.seq_model.0.weight": weight,
        "mixture_weights.seq_model.0.bias": bias,
    }
    # Residual retrieval module (their RetrievalModule): LayerNorm, Residual(fc1, fc2, LayerNorm).
    rrm = {
        "norm.weight": 1 + 0.1 * torch.randn(DIM),
        "norm.bias": 0.1 * torch.randn(DIM),
        "res.fc1.weight": torch.randn(4096, DIM) / math.sqrt(DIM),
        "res.fc1.bias": 0.1 * torch.randn(4096),
        "res.fc2.weight": torch.randn(DIM, 4096) / math.sqrt(4096),
        "res.fc2.bias": 0.1 * torch.randn(DIM),
        "res.norm.weight": 1 + 0.1 * torch.randn(DIM),
        "res.norm.bias": 0.1 * torch.randn(DIM),
    }
    # Background: 12-18 photos in two or three places around most components; every fourth component has none.
    lat_rad, lon_rad = np.radians(mus)
    centres = np.degrees(
        np.stack(
            [
                np.arctan2(
                    np.sin(lat_rad),
                    np.hypot(np.cos(lat_rad) * np.cos(lon_rad), np.cos(lat_rad) * np.sin(lon_rad)),
                ),
                np.arctan2(np.cos(lat_rad) * np.sin(lon_rad), np.cos(lat_rad) * np.cos(lon_rad)),
            ],
            axis=1,
        )
    )
    assignments, labels = {}, []
    for comp in range(N_COMPONENTS):
        if comp % 4 == 3:
            continue
        places = centres[comp] + rng.normal(scale=0.1, size=(rng.integers(2, 4), 2))
        count = int(rng.integers(12, 19))
        rows = np.arange(len(labels), len(labels) + count)
        points = places[rng.integers(0, len(places), size=count)] + rng.normal(scale=0.003, size=(count, 2))
        labels.extend(points.tolist())
        assignments[comp] = set(int(r) for r in rows)
    labels = np.asarray(labels)
    labels[:, 0] = np.clip(labels[:, 0], -89.9, 89.9)
    labels[:, 1] = (labels[:, 1] + 180) % 360 - 180
    # Rows are shuffled so that a component's rows are scattered over the file, as in theirs.
    perm = rng.permutation(len(labels))
    inverse = np.argsort(perm)
    assignments = {comp: {int(inverse[r]) for r in rows} for comp, rows in assignments.items()}
    labels = labels[perm]
    embeddings = rng.normal(size=(len(labels), DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)

    files = SimpleNamespace(
        backbone=root / "efficientnet_backbone.pt",
        mvmf=root / "mvmf_head.pt",
        rrm=root / "rrm_head.pt",
        background=root / "back_coll_features.hdf5",
        assignments=root / "cells_assignments.pkl",
    )
    torch.save(backbone.state_dict(), files.backbone)
    torch.save(mvmf, files.mvmf)
    torch.save(rrm, files.rrm)
    with h5py.File(files.background, "w") as f:
        f.create_dataset("features", data=embeddings)  # (N, D), as their evaluation.py reads it
        f.create_dataset("labels", data=labels)
    files.assignments.write_bytes(pickle.dumps(assignments, protocol=4))

    model_dir = root / "model"
    args = ["import", "visloc", "-o", str(model_dir), "-q"]
    for role in ("backbone", "mvmf", "rrm", "background", "assignments"):
        args += [f"--{role}", str(getattr(files, role))]
    assert main(args) == 0
    return SimpleNamespace(
        root=root,
        files=files,
        model_dir=model_dir,
        backbone=backbone,
        photos=photos,
        tensors=tensors,
        features=features,
        mvmf=mvmf,
        centres=centres,
        assignments=assignments,
        labels=labels,
        embeddings=embeddings,
    )


@pytest.fixture(scope="module")
def model(release):
    from geoswc.geolocator import Geolocator

    return Geolocator.from_pretrained(release.model_dir, device="cpu")


def _distance_m(a, b) -> np.ndarray:
    return haversine_vector(np.asarray(a), np.asarray(b), Unit.METERS)


def _random_bn_(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
    return model.eval()


def test_frozen_padding_is_efficientnet_pytorchs_static_padding():
    """B0 (cheap) with efficientnet_pytorch's paddings fixed at its 224 px: timm, frozen at 224, computes the
    same features at sizes whose strided layers see other parities; timm's per-input padding does not."""
    import timm

    from geoswc.classifiers.padding import freeze_same_padding
    from geoswc.importers.visloc import efficientnet_to_timm

    torch.manual_seed(0)
    theirs = _random_bn_(efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", include_top=False))
    ours = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=0).eval()
    ours.load_state_dict(efficientnet_to_timm(theirs.state_dict(), ours))
    x = torch.randn(2, 3, 66, 90)
    with torch.no_grad():
        reference = theirs(x).flatten(1)
        dynamic = ours(x)
        freeze_same_padding(ours, (224, 224))
        frozen = ours(x)
    assert torch.allclose(frozen, reference, atol=1e-5, rtol=0)
    assert (dynamic - reference).abs().max() > 1e-3


def test_resize_shortest_is_torchvisions_resize():
    from torchvision import transforms as T

    from geoswc.data.transforms import build_transform

    ours = build_transform(
        {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"},
        train=False,
        size=300,
        eval_resize="shortest",
    )
    theirs = _their_transform()
    rng = np.random.default_rng(0)
    for width, height in [(480, 360), (361, 479), (300, 300), (1000, 301), (200, 150)]:
        coarse = rng.uniform(0, 255, size=(3, 4, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        a, b = ours(image), theirs(image)
        assert a.shape == b.shape, (width, height)
        # smooth images: OpenCV's and PIL's bilinear resizes agree to a few grey levels
        assert (a - b).abs().mean() < 0.05
    assert T.Resize(300)(Image.new("RGB", (1000, 301))).size == (996, 300)


def test_assignment_pairs_and_component_cells():
    from geoswc.importers.visloc import assignment_pairs, component_partition

    comps, rows = assignment_pairs(
        {2: {5, 1}, 0: {3}, 1: set(), 4: [0, 5]}, n_components=5, n_rows=6, source="a.pkl"
    )
    # sorted by component then row; a row in two components appears once for each
    assert comps.tolist() == [0, 2, 2, 4, 4] and rows.tolist() == [3, 1, 5, 0, 5]
    with pytest.raises(ValueError, match="component 7"):
        assignment_pairs({7: {0}}, n_components=5, n_rows=6, source="a.pkl")
    with pytest.raises(ValueError, match="row 6"):
        assignment_pairs({1: {6}}, n_components=5, n_rows=6, source="a.pkl")
    with pytest.raises(ValueError, match="a.pkl"):
        assignment_pairs([1, 2], n_components=5, n_rows=6, source="a.pkl")
    part = component_partition(np.array([[10.0, 20.0], [10.0, 20.0001], [-33.9, 151.2]]), np.array([3, 0, 1]))
    assert len(part) == 3 and part.counts.tolist() == [3, 0, 1]
    # each cell is named by the leaf containing its centre: the centre falls in its own cell
    np.testing.assert_array_equal(part.assign(part.centers_deg[:, 0], part.centers_deg[:, 1]), [0, 1, 2])
    with pytest.raises(ValueError, match="components 0 and 2"):
        component_partition(np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]), np.zeros(3))


def test_sources_are_files_or_urls_when_asked(tmp_path):
    from geoswc.importers.visloc import resolve_source

    with pytest.raises(ValueError, match="--download"):
        resolve_source("https://mever.iti.gr/visloc/rrm_head.pt", "rrm")
    with pytest.raises(FileNotFoundError, match="--rrm"):
        resolve_source(tmp_path / "rrm_head.pt", "rrm")
    path = tmp_path / "rrm_head.pt"
    path.write_bytes(b"weights")
    assert resolve_source(path, "rrm", sha256=hashlib.sha256(b"weights").hexdigest()) == path
    with pytest.raises(ValueError, match="does not match"):
        resolve_source(path, "rrm", sha256="1" * 64)


@pytest.mark.slow
def test_backbone_conversion_gives_the_same_pooled_features(release):
    from geoswc.importers.visloc import convert_backbone, efficientnet_to_timm

    converted = convert_backbone(release.backbone.state_dict())
    # the photos (300 px short side) and a size whose strided layers see other parities than at 380 px
    inputs = [release.tensors[0][None], release.tensors[1][None], torch.randn(2, 3, 64, 96)]
    plain_gap = 0.0
    plain = __import__("timm").create_model("tf_efficientnet_b4", pretrained=False, num_classes=0).eval()
    plain.load_state_dict(efficientnet_to_timm(release.backbone.state_dict(), plain))
    with torch.no_grad():
        for x in inputs:
            theirs = release.backbone(x).flatten(1)
            assert torch.allclose(converted(x), theirs, atol=1e-4, rtol=0), tuple(x.shape)
            plain_gap = max(plain_gap, float((plain(x) - theirs).abs().max()))
    # timm's per-input "same" padding alone is not their model away from 380 px
    assert plain_gap > 1e-3


@pytest.mark.slow
def test_model_folder_and_provenance(release, model):
    import json

    from geoswc.config import Config

    config = Config.load(release.model_dir / "config.yaml")
    assert (config.data.image_size, config.data.eval_resize) == (300, "shortest")
    assert (
        tuple(model.data_config["mean"]) == IMAGENET_MEAN and tuple(model.data_config["std"]) == IMAGENET_STD
    )
    assert model.data_config["interpolation"] == "bilinear"
    spec = json.loads((release.model_dir / "backbone.json").read_text())
    assert spec["model"] == "tf_efficientnet_b4" and spec["static_same_padding"] == [380, 380]
    # cells: one per component, centred on its mean moved onto the usual ranges
    fine = model.geocells.fine
    assert len(fine) == N_COMPONENTS
    np.testing.assert_allclose(fine.centers_deg[3], [85.0, -170.0], atol=1e-9)
    np.testing.assert_allclose(fine.centers_deg[5], [12.0, -160.0], atol=1e-9)
    assert np.all(_distance_m(fine.centers_deg, release.centres) < 1e-3)
    expected_counts = [len(release.assignments.get(c, ())) for c in range(N_COMPONENTS)]
    np.testing.assert_array_equal(fine.counts, expected_counts)
    # index: every component's rows, with their positions
    index = model.index
    np.testing.assert_array_equal(index.cell_sizes(), expected_counts)
    rows = np.asarray(index.ids, dtype=np.int64)
    for comp, members in release.assignments.items():
        assert set(rows[index.offsets[comp] : index.offsets[comp + 1]].tolist()) == members
    np.testing.assert_allclose(index.latlon, release.labels[rows])
    np.testing.assert_allclose(
        np.asarray(index.embeddings, np.float32), release.embeddings[rows], rtol=0, atol=0
    )
    # MvMF concentrations: kappa = exp(kappas + 16)
    np.testing.assert_allclose(
        model.heads["mvmf"].log_kappa.detach().double().numpy(),
        release.mvmf["mvmf.kappas"].numpy() + 16,
        rtol=1e-6,
    )
    # provenance: the SHA-256 of every source file
    provenance = json.loads((release.model_dir / "import.json").read_text())
    for role in ("backbone", "mvmf", "rrm", "background", "assignments"):
        path = getattr(release.files, role)
        assert provenance["files"][role]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.geocells.settings["import"]["files"] == provenance["files"]


@pytest.mark.slow
def test_predictions_equal_a_hand_computation(release, model):
    """Component, coordinates and prediction density from the saved tensors with numpy, on the same tensors."""
    weight = release.mvmf["mixture_weights.seq_model.0.weight"].double().numpy()
    bias = release.mvmf["mixture_weights.seq_model.0.bias"].double().numpy()
    for x, f in zip(release.tensors[:3], release.features[:3]):
        pred = model.locate(model.features(x[None]), head="mvmf", mode="cell")
        logits = weight @ f.double().numpy() + bias
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(np.argmax(probs))
        assert int(pred.cell_idx[0]) == best
        assert _distance_m(pred.latlon_deg[:1], release.centres[best : best + 1])[0] < 1.0
        near = (
            _distance_m(np.repeat(release.centres[best : best + 1], N_COMPONENTS, 0), release.centres)
            <= 25_000
        )
        assert abs(pred.confidence[0] - probs[near].sum()) < 1e-5


@pytest.mark.slow
def test_urls_need_download(release, tmp_path, capsys):
    args = [
        "import",
        "visloc",
        "-o",
        str(tmp_path / "m"),
        "--mvmf",
        "https://mever.iti.gr/visloc/mvmf_head.pt",
    ]
    for role in ("backbone", "rrm", "background", "assignments"):
        args += [f"--{role}", str(getattr(release.files, role))]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--download" in err and "mvmf_head.pt" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_crafted_inputs_are_refused(release, tmp_path, capsys):
    import os

    class Shell:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil_pkl = tmp_path / "cells_assignments.pkl"
    evil_pkl.write_bytes(pickle.dumps({0: Shell()}))
    evil_pt = tmp_path / "mvmf_head.pt"
    torch.save({"x": Shell()}, evil_pt)
    wrong_pt = tmp_path / "rrm_head.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong_pt)
    for role, path, expected in (
        ("assignments", evil_pkl, "system"),
        ("mvmf", evil_pt, "refused: the MvMF head file calls"),
        ("rrm", wrong_pt, "not the authors' retrieval module"),
    ):
        files = {
            r: getattr(release.files, r) for r in ("backbone", "mvmf", "rrm", "background", "assignments")
        }
        files[role] = path
        args = ["import", "visloc", "-q", "-o", str(tmp_path / f"m_{role}")]
        for r, p in files.items():
            args += [f"--{r}", str(p)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert str(path) in err and expected in err, err
        assert "weights_only set to False" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pwned").exists()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_import_downloads_urls_when_asked(release, tmp_path):
    """--download fetches URLs (from a local server) into --download-dir, checked with --sha256."""
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(release.root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        # an interrupted earlier download of the MvMF head: resumed
        data = release.files.mvmf.read_bytes()
        (downloads / "mvmf_head.pt.part").write_bytes(data[: len(data) // 3])
        digest = hashlib.sha256(data).hexdigest()
        args = [
            "import",
            "visloc",
            "-q",
            "-o",
            str(tmp_path / "model"),
            "--download",
            "--download-dir",
            str(downloads),
        ]
        args += ["--mvmf", f"{base}/mvmf_head.pt", "--sha256", f"mvmf={digest}"]
        args += ["--rrm", f"{base}/rrm_head.pt"]
        for role in ("backbone", "background", "assignments"):
            args += [f"--{role}", str(getattr(release.files, role))]
        assert main(args) == 0
        assert (downloads / "mvmf_head.pt").read_bytes() == data
        assert (downloads / "rrm_head.pt").read_bytes() == release.files.rrm.read_bytes()
        import json

        provenance = json.loads((tmp_path / "model" / "import.json").read_text())
        assert provenance["files"]["mvmf"]["url"] == f"{base}/mvmf_head.pt"
        # a wrong checksum is refused before anything is written
        bad = (
            args[: args.index("--sha256")]
            + ["--sha256", "mvmf=" + "0" * 64]
            + args[args.index("--sha256") + 2 :]
        )
        bad[bad.index("-o") + 1] = str(tmp_path / "model2")
        assert main(bad) == 2
        assert not (tmp_path / "model2").exists()
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------------------------ the authors' code as oracle
@pytest.fixture(scope="module")
def their_model(release, shared_reference):
    """Their GeoLocModel (src/modules.py) with the files of `release` loaded, built without downloading."""
    pytest.importorskip("einops")
    pytest.importorskip("sklearn")
    repo = shared_reference / "peers" / "visloc-estimation"
    sys.path.insert(0, str(repo))
    try:
        from src import modules, utils
    finally:
        sys.path.remove(str(repo))
    backbone = modules.Backbone.__new__(modules.Backbone)
    torch.nn.Module.__init__(backbone)
    backbone.base_cnn = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4", include_top=False)
    backbone.base_cnn.load_state_dict(torch.load(release.files.backbone, weights_only=True))
    initial = [tuple(x) for x in release.mvmf["mvmf.mus"].numpy().T]
    cls_head = modules.MVMFModule(initial_mu_kappa=initial, dim_of_features=DIM, pretrained=False)
    cls_head.load_state_dict(torch.load(release.files.mvmf, weights_only=True))
    rrm_head = modules.RetrievalModule(pretrained=False)
    rrm_head.load_state_dict(torch.load(release.files.rrm, weights_only=True))
    model = modules.GeoLocModel.__new__(modules.GeoLocModel)
    torch.nn.Module.__init__(model)
    model.backbone, model.cls_head, model.rrm_head = backbone, cls_head, rrm_head
    model.eval()

    cache = {}

    def locate(tensor):
        """Their evaluation.py's loop body for one photo: (component, prediction, prediction density)."""
        key = hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
        if key not in cache:
            cache[key] = _their_locate(tensor)
        return cache[key]

    def _their_locate(tensor):
        with torch.no_grad():
            prediction, cell_probs, embeddings = model(tensor[None])
        embeddings = embeddings.numpy()
        cell_probs = cell_probs[0].numpy()
        max_cell = np.argmax(cell_probs)
        if max_cell in release.assignments:
            idxs = np.array(list(release.assignments[max_cell]))
            sims = np.dot(embeddings, release.embeddings.T[:, idxs])[0]
            nns = np.argsort(-sims)[:10]
            pr = utils.spatial_clustering(release.labels[idxs[nns]], sims[nns], radius=1.0, a=0)
        else:
            pr = prediction[0].numpy()
        mus = model.cls_head.mus.t().detach().numpy()
        density = utils.prediction_density(max_cell, cell_probs, mus, scales=[25])[25]
        return int(max_cell), np.asarray(pr, dtype=np.float64), float(density)

    return SimpleNamespace(locate=locate, transform=utils.Preprocessing("inference", backbone="efficientnet"))


def _normalised(latlon):
    lat, lon = np.radians(latlon)
    x, y, z = np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)
    return np.array([np.degrees(np.arctan2(z, np.hypot(x, y))), np.degrees(np.arctan2(y, x))])


@pytest.mark.shared
@pytest.mark.slow
def test_parity_with_their_code_on_the_same_tensors(release, model, their_model):
    components, methods = set(), set()
    for tensor in release.tensors:
        comp, latlon, density = their_model.locate(tensor)
        pred = model.locate(model.features(tensor[None]), head="mvmf", mode="swc")
        assert int(pred.cell_idx[0]) == comp
        assert _distance_m(pred.latlon_deg[:1], _normalised(latlon)[None])[0] < 1.0
        assert abs(float(pred.confidence[0]) - density) < 1e-5
        components.add(comp)
        methods.add(str(pred.method[0]))
    # the photos reach several components, some with background photos (swc) and some without (fallback)
    assert len(components) >= 3 and methods == {"swc", "fallback"}, (components, methods)


@pytest.mark.shared
@pytest.mark.slow
def test_parity_with_their_code_from_jpeg_files(release, model, their_model):
    ours = model.predict([str(p) for p in release.photos], head="mvmf", mode="swc", batch_size=4)
    # their inference.py: Image.open(path).convert("RGB"), their transform, the model
    theirs = [
        their_model.locate(their_model.transform(Image.open(p).convert("RGB")))[0] for p in release.photos
    ]
    same = np.mean([o["cell_idx"] == t for o, t in zip(ours, theirs)])
    assert same >= 0.98, (same, [o["cell_idx"] for o in ours], theirs)
    assert len(set(theirs)) >= 3
