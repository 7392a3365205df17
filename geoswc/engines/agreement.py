"""The agreement record of a model folder (``precision.json``): whether its backbone may run in reduced
precision (int8, bfloat16) because the predictions stay those of float32.

The rule (docs/inference.md): on held-out photos, the top-1 cell must be float32's for >= 99.5 % of them and
the coordinates (Search within Cell, or the head alone for a model without an index) within 1 km of float32's
for >= 99 %. `measure_precisions` runs float32 and each reduced precision on the same photos and writes the
shares, the photos counted, the machine and the versions; for int8 it calibrates the activation ranges on other
photos (`geoswc.engines.quantize`), tries the schemes from the most quantised on, and keeps the ranges of the
first scheme that meets the rule. bfloat16 is measured only on a CPU that computes it natively (AVX-512 BF16
or AMX): elsewhere it is emulated, far slower than float32, and never offered.

``--runtime auto`` reads the record (`reduced_engines`): a reduced precision joins the engines it times only
where the record's numbers meet the rule, were measured on this backbone (its weights' fingerprint) with the
installed torch and ONNX Runtime, and the engine can run here; every decision is logged with its reason
(``geoswc -v``, ``geoswc info --model``).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from geoswc.data.sphere import haversine_km
from geoswc.data.validation import check_choice
from geoswc.engines.graphs import fingerprint_of, read_bytes, write_atomically
from geoswc.precision import cpu_flags, cpu_has_native_bf16

logger = logging.getLogger(__name__)

RECORD_FILE = "precision.json"
RECORD_FORMAT = 1
TOP1_RULE = 0.995
KM1_RULE = 0.99
PRECISIONS = ("int8", "bf16")
# What fit, import and assemble measure on: photos compared, photos calibrated on.
DEFAULT_PHOTOS = 64
DEFAULT_CALIBRATION = 32


def _versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {"torch": torch.__version__}
    for package in ("onnxruntime", "openvino"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def agreement(
    reference_cells: np.ndarray, reference_latlon: np.ndarray, cells: np.ndarray, latlon: np.ndarray
) -> Dict[str, Any]:
    """How far predictions ``(cells (N,), latlon (N, 2) degrees)`` are from float32's: the share with the
    same top-1 cell, the share within 1 km, the largest distance, and whether that meets the rule."""
    reference_cells, cells = np.asarray(reference_cells), np.asarray(cells)
    if len(cells) == 0 or len(cells) != len(reference_cells):
        raise ValueError(
            f"agreement needs the same photos in both runs, got {len(reference_cells)} and {len(cells)}"
        )
    reference_latlon, latlon = np.asarray(reference_latlon, float), np.asarray(latlon, float)
    km = np.asarray(haversine_km(reference_latlon[:, 0], reference_latlon[:, 1], latlon[:, 0], latlon[:, 1]))
    entry = {
        "photos": int(len(cells)),
        "top1_same": float(np.mean(reference_cells == cells)),
        "within_1km": float(np.mean(km <= 1.0)),
        "max_km": float(km.max()),
    }
    entry["agrees"] = meets_rule(entry)
    return entry


def meets_rule(entry: Dict[str, Any]) -> bool:
    """Whether a record entry's numbers meet the rule (the numbers, not its own ``agrees``, decide)."""
    top1, km1 = entry.get("top1_same"), entry.get("within_1km")
    numbers = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (top1, km1)
    )
    return bool(numbers and top1 >= TOP1_RULE and km1 >= KM1_RULE and int(entry.get("photos", 0) or 0) > 0)


def split_photos(
    paths: Sequence[str], *, photos: int, calibration: int, seed: int = 0
) -> Tuple[List[str], List[str]]:
    """``calibration`` photos to calibrate on and up to ``photos`` other ones to compare on, drawn from
    ``paths`` by a seeded shuffle (the same folder gives the same split)."""
    order = np.random.default_rng(seed).permutation(len(paths))
    chosen = [str(paths[i]) for i in order]
    return chosen[:calibration], chosen[calibration : calibration + photos]


def _batches(model, paths: Sequence[str], batch_size: int):
    """Decoded, transformed batches of ``paths`` (unreadable photos skipped), with their paths."""
    from geoswc.data.photos import PhotoDataset, photo_batches

    dataset = PhotoDataset(list(paths), model.transform)
    for batch in photo_batches(dataset, batch_size=batch_size, workers=0):
        if batch.pixels is not None and len(batch.indices):
            yield batch.pixels.contiguous(memory_format=torch.channels_last)


def _predict(model, forward: Callable, batches, options) -> Tuple[np.ndarray, np.ndarray]:
    cells, latlon = [], []
    for pixels in batches:
        with torch.inference_mode():
            features = forward(pixels).float()
        for record in model.predict_from_features(features, **options):
            cells.append(record["cell_idx"])
            latlon.append((record["lat"], record["lon"]))
    return np.asarray(cells), np.asarray(latlon, dtype=float).reshape(-1, 2)


def _bf16_forward(module: nn.Module, *, threads: Optional[int] = None) -> Tuple[str, Callable]:
    """The engine that runs bfloat16 here (OpenVINO where installed and natively bf16, else PyTorch autocast)."""
    from geoswc.runtime import missing_packages

    if not missing_packages("openvino"):
        from geoswc.engines import openvino

        if openvino.native_bf16():
            return "openvino-bf16", openvino.OpenVinoForward(module, threads=threads, precision="bf16")
    return "torch-bf16", TorchBf16Forward(module)


class TorchBf16Forward:
    """``module`` under bfloat16 autocast on the CPU, float32 features out."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.failed: Optional[str] = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(pixels).float()


def _calibration_batches(model, paths: Sequence[str], batch_size: int, size: Optional[Tuple[int, int]]):
    for pixels in _batches(model, paths, batch_size):
        if size is None or tuple(pixels.shape[2:]) == size:
            yield pixels.contiguous().numpy()


def _measure_int8(
    model, paths_calibration, held_out, reference, options, schemes, batch_size, all_schemes
) -> Dict[str, Any]:
    from geoswc.engines.quantize import RECIPE, QuantizedForward, calibrate
    from geoswc.runtime import OnnxForward

    backbone = model.backbone
    first = next(iter(held_out), None)
    exporter = OnnxForward(backbone)
    example = first[:1].contiguous()
    graph = exporter._graph(example, dynamic_size=not exporter.per_size)
    size = tuple(example.shape[2:]) if exporter.per_size else None
    calibration = list(_calibration_batches(model, paths_calibration, batch_size, size))
    if not calibration:
        size_note = f" of {size[0]}x{size[1]} pixels" if size else ""
        return {"measured": False, "reason": f"none of the calibration photos could be read{size_note}"}
    tried, entry = [], None
    for scheme in schemes:
        _, ranges = calibrate(graph, iter(calibration), scheme)
        forward = QuantizedForward(backbone, ranges, scheme)
        cells, latlon = _predict(model, forward, held_out, options)
        if forward.failed:
            result = {"scheme": scheme, "error": forward.failed, "agrees": False}
        else:
            result = {"scheme": scheme, **agreement(*reference, cells, latlon)}
        tried.append(result)
        logger.info("int8 %s against fp32: %s", scheme, _numbers(result))
        if result["agrees"] and entry is None:
            entry = {
                "engine": "onnx-int8",
                **result,
                "recipe": RECIPE,
                "ranges": {k: list(v) for k, v in ranges.items()},
            }
            if not all_schemes:
                break
    entry = entry or {"engine": "onnx-int8", "recipe": RECIPE, **tried[-1]}
    entry["tried"] = [{k: v for k, v in t.items()} for t in tried]
    entry["calibration_photos"] = len(paths_calibration)
    return entry


def measure_precisions(
    model: Any,
    paths: Sequence[str],
    *,
    held_out: Optional[Sequence[str]] = None,
    compared: int = DEFAULT_PHOTOS,
    calibration: int = DEFAULT_CALIBRATION,
    precisions: Sequence[str] = PRECISIONS,
    schemes: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    flags: Optional[FrozenSet[str]] = None,
    all_schemes: bool = False,
) -> Dict[str, Any]:
    """The agreement record of ``model`` (a `Geolocator` on the CPU) for ``precisions``.

    Args:
        model: the loaded model.
        paths: photos of its background: ``calibration`` of them calibrate int8, up to ``compared`` others
            (or ``held_out``, when given) are compared.
        held_out: photos to compare on instead of the rest of ``paths``.
        precisions: ``int8`` and/or ``bf16``.
        schemes: the int8 schemes to try, in order (default: all of `geoswc.engines.quantize.SCHEMES`).
        flags: the CPU's flags (default: this one's), deciding whether bf16 is measured.
        all_schemes: measure every scheme (default: stop at the first that agrees; the record keeps the ranges
            of the first that agrees either way).

    Raises:
        ValueError: an unknown precision, or no readable photo to compare or calibrate on.
    """
    from geoswc.engines.quantize import SCHEMES

    for precision in precisions:
        check_choice("precision", precision, PRECISIONS)
    calibration_paths, compared_paths = split_photos(paths, photos=compared, calibration=calibration)
    if held_out is not None:
        compared_paths = [str(p) for p in held_out][:compared]
    if not compared_paths:
        raise ValueError(
            f"no photos to compare on: {len(paths)} given, {len(calibration_paths)} kept to calibrate"
        )
    if "int8" in precisions and not calibration_paths:
        raise ValueError("no photos to calibrate int8 on")
    options = {"mode": "swc" if model.index is not None and model.retrieval is not None else "cell"}
    held = list(_batches(model, compared_paths, batch_size))
    if not held:
        raise ValueError(f"none of the {len(compared_paths)} photos to compare on could be read")
    backbone = model.backbone.eval()
    reference = _predict(model, backbone, held, options)
    record: Dict[str, Any] = {
        "format": RECORD_FORMAT,
        "backbone": fingerprint_of(backbone),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        "photos": int(len(reference[0])),
        "mode": options["mode"],
        "rule": {"top1_same": TOP1_RULE, "within_1km": KM1_RULE},
        "precisions": {},
    }
    if "int8" in precisions:
        from geoswc.runtime import missing_onnx_packages

        if missing_onnx_packages():
            record["precisions"]["int8"] = {"measured": False, "reason": "needs onnxruntime and onnx"}
        else:
            record["precisions"]["int8"] = _measure_int8(
                model,
                calibration_paths,
                held,
                reference,
                options,
                list(schemes or SCHEMES),
                batch_size,
                all_schemes,
            )
    if "bf16" in precisions:
        if not cpu_has_native_bf16(flags):
            record["precisions"]["bf16"] = {"measured": False, "reason": "this CPU has no native bfloat16"}
        else:
            engine, forward = _bf16_forward(backbone)
            cells, latlon = _predict(model, forward, held, options)
            failed = getattr(forward, "failed", None)
            result = {"error": failed, "agrees": False} if failed else agreement(*reference, cells, latlon)
            record["precisions"]["bf16"] = {"engine": engine, **result}
    return record


def _machine() -> Dict[str, Any]:
    from geoswc.engines.choice import machine

    return machine()


def parts_digest(folder) -> Optional[str]:
    """A digest of the SHA-256 of every part the folder's ``geolocator.json`` records (heads, retrieval module
    and index decide the predictions as much as the backbone does); None where there is no such record."""
    data = read_bytes(Path(folder) / "geolocator.json")
    try:
        parts = json.loads(data)["sha256"] if data else None
    except (ValueError, KeyError, TypeError):
        parts = None
    if not isinstance(parts, dict):
        return None
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def record_folder(model: Any, folder, photos: Sequence[str], **options: Any) -> Dict[str, Any]:
    """`measure_precisions` of ``model`` (loaded from ``folder``, in float32 on the CPU) on ``photos``, stored
    as the folder's record, bound to its parts (`parts_digest`); ``options`` as `measure_precisions`."""
    record = measure_precisions(model, photos, **options)
    record["parts"] = parts_digest(folder)
    write_record(folder, record)
    return record


def record_path(folder) -> Path:
    return Path(folder) / RECORD_FILE


def write_record(folder, record: Dict[str, Any]) -> Path:
    """Store ``record`` as the folder's ``precision.json`` (built aside and swapped in; a link there is
    replaced, never written through)."""
    path = record_path(folder)
    if not write_atomically(path, (json.dumps(record, indent=1) + "\n").encode()):
        raise ValueError(f"{path}: cannot write the agreement record")
    return path


def read_record(folder) -> Optional[Dict[str, Any]]:
    """The folder's agreement record; None where there is none or it is not a JSON object (logged: a damaged
    record only means that nothing runs in reduced precision)."""
    if folder is None:
        return None
    path = record_path(folder)
    data = read_bytes(path)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("precisions"), dict):
        logger.warning("%s is not an agreement record; every precision but fp32 stays off", path)
        return None
    return record


@dataclass
class Decision:
    """Whether one reduced precision may be timed by ``--runtime auto``, and why."""

    precision: str
    engine: Optional[str] = None
    admitted: bool = False
    reason: str = ""
    factory: Optional[Callable[..., Callable]] = field(default=None, repr=False)


def _numbers(entry: Dict[str, Any]) -> str:
    if entry.get("error"):
        return f"failed ({entry['error']})"
    return (
        f"top-1 cell as fp32 {100 * entry.get('top1_same', 0):.1f} %, within 1 km "
        f"{100 * entry.get('within_1km', 0):.1f} % on {entry.get('photos', 0)} photos"
    )


def _int8_decision(record, entry, backbone, versions) -> Decision:
    from geoswc.engines.quantize import RECIPE, check_ranges, check_scheme, ranges_digest
    from geoswc.runtime import missing_onnx_packages

    decision = Decision("int8", engine="onnx-int8")
    if missing_onnx_packages():
        decision.reason = "needs onnxruntime and onnx"
        return decision
    if record.get("versions", {}).get("onnxruntime") != versions["onnxruntime"]:
        decision.reason = (
            f"measured with ONNX Runtime {record.get('versions', {}).get('onnxruntime')}, this is "
            f"{versions['onnxruntime']}: measure again (geoswc precision check)"
        )
        return decision
    if entry.get("recipe") != RECIPE:
        decision.reason = (
            f"measured with other quantisation settings ({str(entry.get('recipe'))[:80]}): measure again"
        )
        return decision
    try:
        scheme = check_scheme(entry.get("scheme"))
        ranges = check_ranges(entry.get("ranges"), source=RECORD_FILE)
    except ValueError as err:
        decision.reason = str(err)
        return decision

    def factory(module, *, threads=None):
        from geoswc.engines.quantize import QuantizedForward

        return QuantizedForward(module, ranges, scheme, threads=threads)

    factory.key = ranges_digest(ranges, scheme)
    decision.admitted, decision.factory = True, factory
    decision.reason = f"{scheme} agrees: {_numbers(entry)}"
    return decision


def _bf16_decision(entry, flags) -> Decision:
    decision = Decision("bf16", engine=entry.get("engine"))
    if not cpu_has_native_bf16(flags):
        decision.reason = "this CPU has no native bfloat16 (avx512_bf16 or amx_bf16)"
        return decision
    if entry.get("engine") == "openvino-bf16":
        from geoswc.runtime import missing_packages

        if missing_packages("openvino"):
            decision.reason = "measured in OpenVINO, which is not installed"
            return decision

        def factory(module, *, threads=None):
            from geoswc.engines.openvino import OpenVinoForward

            return OpenVinoForward(module, threads=threads, precision="bf16")

    elif entry.get("engine") == "torch-bf16":

        def factory(module, *, threads=None):
            return TorchBf16Forward(module)

    else:
        decision.reason = f"unknown bf16 engine {str(entry.get('engine'))[:40]!r} in {RECORD_FILE}"
        return decision
    decision.admitted, decision.factory = True, factory
    decision.reason = f"agrees: {_numbers(entry)}"
    return decision


def decide(
    record: Optional[Dict[str, Any]], backbone: nn.Module, *, flags: Optional[FrozenSet[str]] = None
) -> List[Decision]:
    """For each reduced precision, whether ``--runtime auto`` may time it on ``backbone`` here, and why."""
    if record is None:
        return [
            Decision(p, reason=f"no agreement record ({RECORD_FILE}): geoswc precision check")
            for p in PRECISIONS
        ]
    decisions = []
    versions = _versions()
    same_backbone = record.get("backbone") == fingerprint_of(backbone)
    same_torch = record.get("versions", {}).get("torch") == versions["torch"]
    for precision in PRECISIONS:
        entry = record["precisions"].get(precision)
        if not isinstance(entry, dict):
            decisions.append(Decision(precision, reason="not in the agreement record"))
        elif entry.get("measured") is False:
            decisions.append(Decision(precision, reason=f"not measured: {str(entry.get('reason'))[:120]}"))
        elif not meets_rule(entry):
            decisions.append(
                Decision(
                    precision,
                    engine=entry.get("engine"),
                    reason=f"does not agree ({_numbers(entry)}; the rule: >= {100 * TOP1_RULE:g} % and "
                    f">= {100 * KM1_RULE:g} %)",
                )
            )
        elif not same_backbone:
            decisions.append(Decision(precision, reason="the record was measured on other backbone weights"))
        elif not same_torch:
            decisions.append(
                Decision(
                    precision,
                    reason=f"measured with torch {record.get('versions', {}).get('torch')}, this is "
                    f"{versions['torch']}: measure again (geoswc precision check)",
                )
            )
        elif precision == "int8":
            decisions.append(_int8_decision(record, entry, backbone, versions))
        else:
            decisions.append(_bf16_decision(entry, cpu_flags() if flags is None else flags))
    return decisions


def folder_decisions(folder, backbone: nn.Module) -> Tuple[Optional[Dict[str, Any]], List[Decision]]:
    """The folder's record and `decide`'s decisions, where a record measured on other parts of the model
    (another head, retrieval module or index: `parts_digest`) admits nothing."""
    record = read_record(folder)
    if record is not None and record.get("parts") != parts_digest(folder):
        return record, [
            Decision(p, reason="the record was measured on other parts of the model") for p in PRECISIONS
        ]
    return record, decide(record, backbone)


def reduced_engines(folder, backbone: nn.Module) -> Dict[str, Callable[..., Callable]]:
    """The reduced-precision engines ``--runtime auto`` may time for the model folder ``folder``: engine name
    -> factory ``(module, threads=) -> forward``; each decision is logged with its reason."""
    record, decisions = folder_decisions(folder, backbone)
    if record is None:
        logger.info(
            "int8 and bf16 not admitted: no agreement record in %s (geoswc precision check %s --photos DIR)",
            folder,
            folder,
        )
        return {}
    engines = {}
    for decision in decisions:
        logger.info(
            "%s %s: %s",
            decision.precision,
            "admitted" if decision.admitted else "not admitted",
            decision.reason,
        )
        if decision.admitted:
            engines[decision.engine] = decision.factory
    return engines


def format_record(record: Optional[Dict[str, Any]], decisions: Sequence[Decision]) -> str:
    """The record as lines: where it was measured, each precision's numbers and whether auto may use it."""
    if record is None:
        return f"agreement record: none ({RECORD_FILE}); auto runs float32 only (geoswc precision check)"
    box = record.get("machine", {}) if isinstance(record.get("machine"), dict) else {}
    lines = [
        f"agreement record ({RECORD_FILE}): {record.get('photos')} photos, {record.get('mode')}, measured "
        f"{record.get('measured_at')} on {box.get('cpu', '?')}",
    ]
    for precision, entry in record["precisions"].items():
        if not isinstance(entry, dict):
            continue
        for tried in entry.get("tried", []) if isinstance(entry.get("tried"), list) else []:
            if isinstance(tried, dict):
                lines.append(f"  {precision} {tried.get('scheme')}: {_numbers(tried)}")
        if "tried" not in entry and entry.get("measured") is not False:
            lines.append(f"  {precision} ({entry.get('engine')}): {_numbers(entry)}")
    for decision in decisions:
        lines.append(
            f"  {decision.precision}: {'admitted' if decision.admitted else 'off'}: {decision.reason}"
        )
    return "\n".join(lines)
