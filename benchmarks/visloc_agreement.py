"""How closely an imported visloc model computes what the authors' code computes, under each padding rule.

The figures of docs/visloc.md ("How it is checked"). The release is the one of tests/test_visloc_import.py: a
random efficientnet_pytorch B4 with BatchNorm statistics calibrated on synthetic-world photos, an MvMF head
tuned to reach many components, written in the authors' formats; their code (``../shared/reference/peers/
visloc-estimation``, efficientnet_pytorch as installed, which should be their pinned 0.7.0) is the reference.
For each rule the same files are imported with ``--padding-rule RULE`` and compared:

- the largest difference of the stem's activation and of the pooled features on the photos;
- on the same input tensors: same component, Search within Cell position within 1 m, prediction density
  within 1e-5;
- from the JPEG files through each side's own image path: position within 1 km, same component.

Usage: ``python benchmarks/visloc_agreement.py [--rules efficientnet_pytorch==0.7.0 tensorflow]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_visloc_import as fixture  # noqa: E402

from geoswc.cli import main as cli  # noqa: E402
from geoswc.geolocator import Geolocator  # noqa: E402


def backbone_gaps(release, model) -> dict:
    """Largest |difference| of the stem's activation and of the pooled features over the photos."""
    stem, pooled = 0.0, 0.0
    for tensor in release.tensors:
        theirs = fixture._their_stages(release.backbone, tensor[None])
        ours = fixture._our_stages(model.backbone, tensor[None])
        if theirs[0][1].shape == ours[0][1].shape:
            stem = max(stem, float((theirs[0][1] - ours[0][1]).abs().max()))
        pooled = max(pooled, float((theirs[-1][1] - ours[-1][1]).abs().max()))
    magnitude = release.features.abs().mean(1)
    return {
        "stem_max_diff": stem,
        "pooled_max_diff": pooled,
        "pooled_mean_magnitude": [float(magnitude.min()), float(magnitude.max())],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=["efficientnet_pytorch==0.7.0", "tensorflow"])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the reference folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        release = fixture.build_release(Path(tmp) / "release")
        theirs = fixture.build_their_model(
            release, Path(args.shared) / "reference" / "peers" / "visloc-estimation"
        )
        out = {
            "efficientnet_pytorch": fixture.efficientnet_pytorch.__version__,
            "photos": len(release.photos),
        }
        for rule in args.rules:
            folder = Path(tmp) / f"model-{rule}"
            command = ["import", "visloc", "-q", "-o", str(folder), "--padding-rule", rule]
            for role in ("backbone", "mvmf", "rrm", "background", "assignments"):
                command += [f"--{role}", str(getattr(release.files, role))]
            assert cli(command) == 0
            model = Geolocator.from_pretrained(folder, device="cpu")
            out[rule] = {
                **backbone_gaps(release, model),
                "same_tensors": fixture.same_tensor_agreement(release, model, theirs),
                "jpeg_files": fixture.jpeg_agreement(release, model, theirs),
            }
            print(json.dumps({rule: out[rule]}), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
