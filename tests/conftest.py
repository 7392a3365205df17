import os
from pathlib import Path

import pytest

# No test touches the network: model hubs are offline, models are randomly initialised.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("GEOSWC_SHARED", REPO_ROOT.parent / "shared"))


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
