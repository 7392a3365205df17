"""Shared objects of the place-recognition tests: a tiny street world, the tiny preset's real ImageNet backbone,
and the benchmark's own modules (Berton et al., CVPR 2022) loaded from ../shared as oracles."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TINY_STREETS = dict(
    streets={"train": 2, "val": 0, "test": 2},
    street_length_m=120.0,
    db_step_m=5.0,
    queries_per_street=6,
    image_size=(64, 48),
)


def make_tiny_world(folder: Path, seed: int = 0) -> Path:
    from geoswc.data.synth_street import make_street_world

    make_street_world(folder, seed=seed, **TINY_STREETS)
    return folder


def tiny_backbone():
    from geoswc.classifiers.backbone import LITE0_PACKAGE, create_backbone

    return create_backbone("tf_efficientnet_lite0", weights=LITE0_PACKAGE).eval()


def benchmark_root(shared_reference: Path) -> Path:
    root = shared_reference / "peers" / "deep-visual-geo-localization-benchmark"
    if not (root / "test.py").is_file():
        pytest.skip(f"the place-recognition benchmark is not at {root}")
    return root


def load_benchmark_module(root: Path, relative: str, name: str):
    """Import one file of the benchmark under a private name (its own imports resolve against its folder)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(name, root / relative)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # an import the installed versions cannot satisfy
        pytest.skip(f"the benchmark's {relative} does not import here: {err}")
    return module


def fails_in_one_line(capsys, args, *needles):
    """``geoswc ARGS`` exits 2 with one line on stderr holding every needle."""
    from geoswc.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
