"""Exported graphs kept on disk, so a run does not pay the export its predecessor already paid.

A graph depends on the network (its architecture and weights: `model_fingerprint`), the input size it was
traced at (only for networks whose padding depends on the size; one dynamic graph serves the others), the
torch version that traced it and the opset. The key of a graph hashes all of them; a change of any one is a
different file, so nothing needs invalidating. Writes are atomic (a temporary file in the same folder, then
``os.replace``) and never follow a link: a concurrent run reads either nothing or a whole graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from geoswc.data.files import atomic_path, cache_dir

logger = logging.getLogger(__name__)


def model_fingerprint(module: nn.Module) -> str:
    """A digest of ``module``'s architecture (its printed structure) and of every parameter and buffer (names,
    dtypes, shapes and values): equal for the same network with the same weights, different otherwise."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(module).encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def fingerprint_of(module: nn.Module) -> str:
    """`model_fingerprint`, computed once per module object (weights do not change at inference)."""
    cached = getattr(module, "_geoswc_fingerprint", None)
    if cached is None:
        cached = model_fingerprint(module)
        object.__setattr__(module, "_geoswc_fingerprint", cached)
    return cached


def read_bytes(path: Path) -> Optional[bytes]:
    """The content of the regular file ``path``, or None if it is missing, unreadable or not a regular file."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        return path.read_bytes()
    except OSError:
        return None


def write_atomically(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file in the same folder swapped in by ``os.replace``
    (which replaces a link at ``path`` rather than writing through it). False, with a debug log, when the folder
    cannot be written: a cache that cannot be written only costs time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_path(path) as temporary:
            temporary.write_bytes(data)
        return True
    except OSError as err:
        logger.debug("cannot write the cache file %s: %s", path, err)
        return False


def graph_key(module: nn.Module, example: torch.Tensor, *, dynamic_size: bool, opset: int) -> str:
    size = "dynamic" if dynamic_size else f"{int(example.shape[2])}x{int(example.shape[3])}"
    fields = {"model": fingerprint_of(module), "size": size, "torch": torch.__version__, "opset": opset}
    return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16).hexdigest()


def cached_export(
    module: nn.Module,
    example: torch.Tensor,
    *,
    dynamic_size: bool,
    export: Callable[..., bytes],
    opset: Optional[int] = None,
) -> bytes:
    """The graph ``export(module, example, dynamic_size=...)`` returns, read from the cache folder when an
    earlier run exported the same network at the same size, exported and stored otherwise."""
    from geoswc.runtime import ONNX_OPSET

    path = (
        cache_dir()
        / "graphs"
        / f"{graph_key(module, example, dynamic_size=dynamic_size, opset=opset or ONNX_OPSET)}.onnx"
    )
    graph = read_bytes(path)
    if graph:
        logger.debug("exported graph read from %s", path)
        return graph
    graph = export(module, example, dynamic_size=dynamic_size)
    if write_atomically(path, graph):
        logger.debug("exported graph stored in %s", path)
    return graph
