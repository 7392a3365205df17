"""The model folder of a `Geolocator` (layout in docs/architecture.md): its format version, the files of its
parts and their SHA-256, and writing one.

``geolocator.json`` records the format version, the parts and the SHA-256 of every part file; reading and
verifying a folder is `Geolocator.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, List, Sequence, Union

import numpy as np

from geoswc import __version__
from geoswc.classifiers import save_backbone, save_head
from geoswc.classifiers.backbone import BACKBONE_JSON_FILE, BACKBONE_WEIGHTS_FILE
from geoswc.geocells import Geocells
from geoswc.retrieval.index import INDEX_FILES, index_files

logger = logging.getLogger(__name__)

# 2: geolocator.json records the SHA-256 of every part ("sha256"); folders of version 1 still load.
# 3: the cells may hold several partitions, each head names its own ("partitions": {head: [names]}) and the
#    index holds the rows per cell of each; folders of versions 1 and 2 (every head on all partitions) load.
FORMAT_VERSION = 3
META_FILE = "geolocator.json"
_HASH_CHUNK = 1 << 22


def save_model_folder(model: Any, directory: Union[str, Path]) -> Path:
    """Write ``model`` (a `Geolocator`) as a model folder; `Geolocator.save_pretrained` is this."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / "config.yaml")
    model.geocells.save(directory / "cells")
    save_backbone(
        model.backbone,
        directory,
        name=model.backbone_name,
        fingerprint=model.fingerprint,
        data_config=_jsonable(model.data_config),
    )
    for kind, head in model.heads.items():
        save_head(head, directory / "heads" / f"{kind}.safetensors", config=model.config)
    if model.retrieval is not None:
        model.retrieval.save(directory / "retrieval.safetensors", fingerprint=model.fingerprint)
    if model.index is not None:
        model.index.save(directory / "index")
    remove_stale_parts(model, directory)
    parts = _part_files(
        directory,
        heads=model.head_names,
        retrieval=model.retrieval is not None,
        index=model.index is not None,
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "geoswc_version": __version__,
        "fingerprint": model.fingerprint,
        "backbone": model.backbone_name,
        "heads": model.head_names,
        "partitions": {
            kind: list(getattr(head, "partitions", model.geocells.names))
            for kind, head in model.heads.items()
        },
        "retrieval": model.retrieval is not None,
        "index": model.index is not None,
        "sha256": {rel: _sha256(directory / rel) for rel in parts},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("saved geolocator to %s", directory)
    return directory


def remove_stale_parts(model: Any, directory: Path) -> None:
    """Remove parts an earlier save left in ``directory`` that ``model`` does not have (a head, the
    retrieval module, the index), so that the folder loads as exactly this model."""
    stale = [p for p in sorted((directory / "heads").glob("*.safetensors")) if p.stem not in model.heads]
    if model.retrieval is None:
        stale.append(directory / "retrieval.safetensors")
    if model.index is None:
        stale += [directory / "index" / name for name in INDEX_FILES]
        stale += sorted((directory / "index").glob("partition_*.npy"))
    for path in stale:
        if path.is_file():
            logger.info("removing %s: left by an earlier save, not part of this model", path)
            path.unlink()
    if model.index is None and (directory / "index").is_dir() and not any((directory / "index").iterdir()):
        (directory / "index").rmdir()


def _part_files(directory: Path, *, heads: Sequence[str], retrieval: bool, index: bool) -> List[str]:
    """The files of a model folder's parts, relative to it (``/``-separated): what is checksummed."""
    files = ["config.yaml"] if (directory / "config.yaml").is_file() else []
    files += [path.relative_to(directory).as_posix() for path in Geocells.folder_files(directory / "cells")]
    files += [BACKBONE_WEIGHTS_FILE, BACKBONE_JSON_FILE]
    files += [f"heads/{kind}.safetensors" for kind in heads]
    if retrieval:
        files.append("retrieval.safetensors")
    if index:
        files += [f"index/{name}" for name in index_files(directory / "index")]
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
