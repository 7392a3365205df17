import os
from pathlib import Path

import pytest

# No test touches the network: model hubs are offline, models are randomly initialised.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engine choices and exported graphs (geoswc.engines) go to a folder of the test session, not the user's cache.
if "GEOSWC_CACHE" not in os.environ:
    import tempfile

    os.environ["GEOSWC_CACHE"] = tempfile.mkdtemp(prefix="geoswc-test-cache-")

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("GEOSWC_SHARED", REPO_ROOT.parent / "shared"))


def free_port() -> int:
    """A TCP port nobody listens on, for ``accelerate launch --main_process_port`` (parallel tests would all
    take the default 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_rank_launch() -> list:
    """The command line of ``accelerate launch`` with two real ranks on this machine (gloo on CPU, no mixed
    precision, no dynamo) on a free port; append ``-m MODULE ARGS...`` or ``SCRIPT ARGS...``."""
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """The optional reference data beside the checkout; tests that need it skip without it."""
    ref = SHARED / "reference"
    if not ref.is_dir():
        pytest.skip(f"optional reference data not found at {ref} (set GEOSWC_SHARED to its parent folder)")
    return ref


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


def build_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """A real model folder in seconds: random-weight `test_efficientnet` backbone (64 px), a partition fitted
    on 400 points around a few hubs, CE/HC/MvMF heads, a retrieval module and an index over ~300 background
    photos embedded by that backbone. Some fine cells hold no background photo (Search within Cell falls back).
    """
    import numpy as np
    import torch
    from PIL import Image

    from geoswc.classifiers import create_backbone, create_head
    from geoswc.config import Config
    from geoswc.geocells import S2Partitioner
    from geoswc.geolocator import Geolocator
    from geoswc.retrieval.index import BackgroundIndex
    from geoswc.retrieval.model import ResidualRetrievalModule

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    hubs = np.array(
        [
            [48.86, 2.35],
            [40.71, -74.0],
            [35.68, 139.69],
            [-33.87, 151.21],
            [51.51, -0.13],
            [41.9, 12.5],
            [37.77, -122.42],
            [-22.91, -43.17],
        ]
    )
    hub = rng.integers(0, len(hubs), size=400)
    latlon = hubs[hub] + rng.normal(scale=[0.15, 0.2], size=(400, 2))
    geocells = S2Partitioner(min_images=4, max_images=(120, 60, 25)).fit(latlon[:, 0], latlon[:, 1]).geocells_

    config = Config().merge(
        {
            "data": {"image_size": 64, "eval_resize": "longest", "num_workers": 0},
            "backbone": {"model": "test_efficientnet", "pretrained": False},
            "retrieval": {"hidden_dim": 64},
        }
    )
    backbone = create_backbone("test_efficientnet", pretrained=False).eval()
    dim = backbone.num_features
    heads = {kind: create_head(kind, in_features=dim, geocells=geocells) for kind in ("ce", "hc", "mvmf")}
    retrieval = ResidualRetrievalModule(dim, hidden_dim=64).eval()
    model = Geolocator(
        backbone=backbone,
        geocells=geocells,
        heads=heads,
        retrieval=retrieval,
        config=config,
        backbone_name="test_efficientnet",
    )

    # Background photos: the first six hubs only, so the cells of the last two stay empty.
    bg = np.flatnonzero(hub < 6)[:300]
    cell_idx = geocells.fine.assign(latlon[bg, 0], latlon[bg, 1])
    bg = bg[cell_idx >= 0]
    cell_idx = cell_idx[cell_idx >= 0]
    pixels = []
    for i in bg:
        tint = np.array([40 * hub[i] % 255, 90, 255 - 30 * hub[i]], dtype=np.float64)
        image = np.clip(tint + rng.normal(scale=40, size=(48, 64, 3)), 0, 255).astype(np.uint8)
        pixels.append(model.transform(Image.fromarray(image)))
    embeddings = model.embed(model.features(torch.stack(pixels)))
    model.index = BackgroundIndex().build(
        embeddings.numpy(),
        cell_idx=cell_idx,
        latlon=latlon[bg],
        ids=[f"bg{i:03d}" for i in bg],
        n_cells=len(geocells.fine),
        fingerprint=geocells.fingerprint,
    )
    return model.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved `Geolocator` folder with every part (see `build_tiny_model`); treat it as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")
