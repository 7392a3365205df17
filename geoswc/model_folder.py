"""The model folder of a `Geolocator` (layout in docs/architecture.md): its format version, the files of its
parts and their SHA-256, and writing one.

``geolocator.json`` records the format version, the parts and the SHA-256 of every part file; reading and
verifying a folder is `Geolocator.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Optional, Sequence, Union


from geoswc import __version__
from geoswc.classifiers import save_backbone, save_head
from geoswc.classifiers.aggregation import RETRIEVAL_POOL_FILE, pool_name, save_retrieval_pool
from geoswc.classifiers.backbone import BACKBONE_JSON_FILE, BACKBONE_WEIGHTS_FILE
from geoswc.classifiers.heads import HEADS
from geoswc.data.files import json_safe as _jsonable  # noqa: F401  (its name here before)
from geoswc.data.files import read_json_object
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
    pool = getattr(model, "retrieval_pool", None)
    if pool is not None:
        save_retrieval_pool(directory / RETRIEVAL_POOL_FILE, pool, channels=int(model.backbone.num_features))
    if model.index is not None:
        model.index.save(directory / "index")
    remove_stale_parts(model, directory)
    parts = _part_files(
        directory,
        heads=model.head_names,
        retrieval=model.retrieval is not None,
        index=model.index is not None,
        retrieval_pool=pool is not None,
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
        **({"retrieval_pool": pool_name(pool)} if pool is not None else {}),
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
    if getattr(model, "retrieval_pool", None) is None:
        stale.append(directory / RETRIEVAL_POOL_FILE)
    if model.index is None:
        stale += [directory / "index" / name for name in INDEX_FILES]
        stale += sorted((directory / "index").glob("partition_*.npy"))
    for path in stale:
        if path.is_file():
            logger.info("removing %s: left by an earlier save, not part of this model", path)
            path.unlink()
    if model.index is None and (directory / "index").is_dir() and not any((directory / "index").iterdir()):
        (directory / "index").rmdir()


def _part_files(
    directory: Path, *, heads: Sequence[str], retrieval: bool, index: bool, retrieval_pool: bool = False
) -> List[str]:
    """The files of a model folder's parts, relative to it (``/``-separated): what is checksummed."""
    files = ["config.yaml"] if (directory / "config.yaml").is_file() else []
    files += [path.relative_to(directory).as_posix() for path in Geocells.folder_files(directory / "cells")]
    files += [BACKBONE_WEIGHTS_FILE, BACKBONE_JSON_FILE]
    files += [f"heads/{kind}.safetensors" for kind in heads]
    if retrieval:
        files.append("retrieval.safetensors")
    if retrieval_pool:
        files.append(RETRIEVAL_POOL_FILE)
    if index:
        files += [f"index/{name}" for name in index_files(directory / "index")]
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Reading a model folder back (`Geolocator.from_pretrained`): its record, checksums and parts checked before
# anything is parsed.


def _check_part(found: Optional[str], expected: str, path: Path) -> None:
    if found is not None and str(found) != expected:
        raise ValueError(
            f"{path} was built on partition {found!r} but the model's cells/ have fingerprint {expected!r}; "
            f"the parts of a model folder must come from the same partition"
        )


def _read_meta(path: Path) -> Dict[str, Any]:
    """``geolocator.json``, checked for the form `save_pretrained` writes."""
    meta = read_json_object(path)
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version} was written by a newer geoswc; this one reads up to "
            f"{FORMAT_VERSION} (upgrade geoswc)"
        )
    if "fingerprint" in meta and not isinstance(meta["fingerprint"], str):
        raise ValueError(f"{path}: fingerprint must be a string, got {meta['fingerprint']!r}")
    return meta


def _check_head_partitions(
    meta: Dict[str, Any], kind: str, partitions: Sequence[str], meta_path: Path, path: Path
) -> None:
    """The partitions ``geolocator.json`` records for a head (format 3) are those its file names."""
    recorded = meta.get("partitions")
    if recorded is None:
        return
    if not isinstance(recorded, dict) or kind not in recorded:
        raise ValueError(f"{meta_path}: partitions must name the partitions of every head, {kind!r} included")
    if list(recorded[kind]) != list(partitions):
        raise ValueError(
            f"{path} predicts over the partitions {list(partitions)}, but {meta_path} records "
            f"{recorded[kind]!r} for head {kind!r}; save the model again"
        )


def _head_names(directory: Path, meta: Dict[str, Any], meta_path: Path) -> List[str]:
    """The heads to load: those ``geolocator.json`` lists (every one must have its file, and every file in
    ``heads/`` must be listed); all files of ``heads/`` for a folder whose JSON lists none."""
    found = sorted(path.stem for path in (directory / "heads").glob("*.safetensors"))
    listed = meta.get("heads")
    if listed is None:
        return found
    if not isinstance(listed, list) or not all(isinstance(kind, str) for kind in listed):
        raise ValueError(f"{meta_path}: heads must be a list of head kinds, got {listed!r}")
    for kind in listed:
        if kind not in HEADS:
            raise ValueError(f"{meta_path}: unknown head {kind!r}; choose among: {', '.join(HEADS)}")
        if kind not in found:
            raise FileNotFoundError(
                f"{meta_path} lists the head {kind!r}, but {directory / 'heads' / (kind + '.safetensors')} is missing"
            )
    for kind in found:
        if kind not in listed:
            raise ValueError(
                f"{directory / 'heads' / (kind + '.safetensors')} is not listed in {meta_path} (heads: "
                f"{', '.join(listed) or 'none'}); remove it, or save the model again with that head"
            )
    return sorted(listed)


def _recorded_path(directory: Path, rel: Any, meta_path: Path) -> Path:
    """The file a checksum entry names; refused (before it is opened) unless it is a relative path inside
    the model folder."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{meta_path}: sha256 keys must be file paths, got {rel!r}")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts + windows.parts:
        raise ValueError(
            f"{meta_path}: sha256 names {rel!r}, which is outside the model folder {directory}; "
            "parts are named relative to it, without '..'"
        )
    return directory / rel


def _verify_checksums(directory: Path, meta: Dict[str, Any]) -> None:
    """Every recorded file matches its SHA-256 (checked before any part is parsed)."""
    meta_path = directory / META_FILE
    record = meta.get("sha256")
    if record is None:
        logger.warning(
            "%s: %s records no checksums (saved by geoswc before checksums were added); its parts are "
            "checked for consistency but cannot be checked against what was saved. Save it again with "
            "Geolocator.save_pretrained to add them.",
            directory,
            META_FILE,
        )
        return
    if not isinstance(record, dict):
        raise ValueError(f"{meta_path}: sha256 must map file paths to digests, got {type(record).__name__}")
    for rel, expected in record.items():
        path = _recorded_path(directory, rel, meta_path)
        if not isinstance(expected, str) or len(expected) != 64:
            raise ValueError(f"{meta_path}: the SHA-256 of {rel!r} must be 64 hex digits, got {expected!r}")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is recorded in {meta_path} but missing")
        actual = _sha256(path)
        if actual != expected.lower():
            raise ValueError(
                f"{path}: SHA-256 {actual} does not match {expected} recorded in {meta_path}; the file was "
                "changed or replaced after the model folder was saved"
            )


def _check_recorded(directory: Path, meta: Dict[str, Any], parts: Sequence[str]) -> None:
    """Every part that was loaded is recorded (a folder without checksums was warned about already)."""
    meta_path = directory / META_FILE
    record = meta.get("sha256")
    if record is None:
        return
    for rel in parts:
        if rel not in record:
            raise ValueError(
                f"{directory / rel} is not recorded in {meta_path} (no SHA-256); it was added after the model "
                "folder was saved"
            )
