"""Where an importer's input files come from: local files, or URLs downloaded only when asked, and ``.pt`` state
dicts read without running their code."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

from geoswc.data.download import check_sha256, download, is_url

PathOrUrl = Union[str, os.PathLike]
# What torch.load(weights_only=True) names when a pickle asks for a callable it does not allow.
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def resolve_source(
    value: PathOrUrl,
    role: str,
    *,
    download_ok: bool = False,
    download_dir: Optional[Union[str, os.PathLike]] = None,
    sha256: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """The local file for one input: ``value`` itself, or for a URL the file downloaded into ``download_dir``
    (only with ``download_ok``), checked against ``sha256`` when given.

    Raises:
        ValueError: a URL without ``download_ok`` (the message says how to allow it), or a checksum mismatch.
        FileNotFoundError: a local file that does not exist.
    """
    if is_url(value):
        url = str(value)
        if not download_ok:
            raise ValueError(
                f"--{role} is a URL ({url}); geoswc downloads only when asked: add --download (files go to "
                "--download-dir), or download it yourself and pass the file"
            )
        name = Path(url.split("?", 1)[0].rstrip("/")).name or role
        return download(url, Path(download_dir or ".") / name, sha256=sha256, progress=progress)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--{role} file not found: {path}")
    if sha256 is not None:
        check_sha256(path, sha256)
    return path


def read_torch_state(path: Union[str, os.PathLike], what: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` state dict, loaded with ``torch.load(weights_only=True)`` (no code runs).

    A ``state_dict`` wrapper and ``module.`` prefixes (DataParallel) are removed.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a state dict of tensors, or asks to run code (``what`` names the part).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError... for a foreign file
        raise ValueError(f"{path}: {_refusal(err, what)}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise ValueError(
            f"{path}: expected the {what}'s state dict (a mapping of tensors), got {type(state)}"
        )
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} of the {what}'s state dict is not a tensor")
        out[str(key).removeprefix("module.")] = value
    return out


def _refusal(err: Exception, what: str) -> str:
    """Why a ``.pt`` file was not loaded, in one line. torch's own message advises loading the file with
    ``weights_only=False``, which would run whatever the file names: that advice is not passed on."""
    if isinstance(err, pickle.UnpicklingError):
        named = _GLOBAL.search(str(err))
        asks = f"calls {named.group(1)} when unpickled" if named else "holds objects other than tensors"
        return (
            f"refused: the {what} file {asks}; geoswc loads only tensors from a .pt file and never runs code a "
            "file names. Ask whoever published it for the plain state dict (or a .safetensors file)"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"not a PyTorch weights file torch.load(weights_only=True) can read ({type(err).__name__}: {first})"
    )
