"""``--runtime auto`` on a CPU: the fastest engine that agrees with PyTorch, measured on this machine.

CPUs differ too much for one fixed answer (on AVX2 cores ONNX Runtime and OpenVINO run EfficientNet about twice
as fast as PyTorch; where OpenVINO or PyTorch have AMX kernels the order changes), so the first run of a model
on a machine measures: the first batch goes through PyTorch and through each installed engine
(`geoswc.runtime.CPU_ENGINES`), each engine's features are compared with PyTorch's (largest difference within
`geoswc.runtime.AGREEMENT_TOLERANCE` of the largest feature), and the engines are timed on the same batch in
interleaved rounds (so a change of load on a shared machine hits them all alike; the best round of each counts).
The fastest engine that agrees runs the backbone. The measurement and the choice are stored as one JSON file
under the cache folder (`geoswc.data.files.cache_dir`), keyed by the CPU model and its ISA flags, the
thread count, the model's fingerprint, the batch's shape and the engines' versions: a later run on the same
machine reads the choice instead of measuring, and a change of any of these measures again.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from geoswc.data.validation import choice_error
from geoswc.data.files import cache_dir
from geoswc.engines.graphs import fingerprint_of, read_bytes, write_atomically
from geoswc.runtime import AGREEMENT_TOLERANCE, CPU_ENGINES, missing_packages

logger = logging.getLogger(__name__)

# The ISA extensions that decide which kernels an engine can use (fp32 FMA width, int8 dot products, bf16).
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
ENGINE_NAMES = {"torch": "PyTorch", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}
ENGINE_PACKAGES = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}
# Timing: at least MIN_ROUNDS interleaved rounds and MIN_SECONDS in all, at most MAX_ROUNDS.
MIN_ROUNDS = 3
MAX_ROUNDS = 20
MIN_SECONDS = 1.0
# Engines in reduced precision (`geoswc.engines.agreement`): timed only where the model's record admits them.
REDUCED_ENGINE_NAMES = {
    "onnx-int8": "ONNX Runtime int8",
    "openvino-bf16": "OpenVINO bf16",
    "torch-bf16": "PyTorch bf16",
}
Factories = Dict[str, Callable[..., Callable]]


def engine_label(engine: str) -> str:
    return ENGINE_NAMES.get(engine) or REDUCED_ENGINE_NAMES.get(engine, engine)


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


def machine() -> Dict[str, Any]:
    """This machine as the choice depends on it: CPU model, its ISA flags of `ISA_FLAGS`, cores, threads."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def engine_versions() -> Dict[str, Optional[str]]:
    """The installed version of each engine's package (None where it is missing), read without importing."""
    versions: Dict[str, Optional[str]] = {}
    for engine, package in ENGINE_PACKAGES.items():
        try:
            versions[engine] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[engine] = None
    return versions


def available_engines() -> List[str]:
    """``torch`` and the CPU engines whose packages are installed."""
    return ["torch"] + [engine for engine in CPU_ENGINES if not missing_packages(engine)]


def choice_fields(
    module: nn.Module, shape: Sequence[int], reduced: Optional[Factories] = None
) -> Dict[str, Any]:
    """What a choice depends on (`choice_key` hashes it): machine, model fingerprint, batch shape, versions,
    and the reduced-precision engines admitted (with their settings' digests)."""
    fields = {
        "machine": machine(),
        "model": fingerprint_of(module),
        "input": [int(v) for v in shape],
        "versions": engine_versions(),
    }
    if reduced:
        fields["reduced"] = {name: getattr(make, "key", "") for name, make in sorted(reduced.items())}
    return fields


def choice_key(fields: Dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16).hexdigest()


def choice_path(key: str) -> Path:
    return cache_dir() / "engines" / f"{key}.json"


def load_record(fields: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The stored measurement for ``fields``, or None if there is none (or it is unreadable or stale)."""
    data = read_bytes(choice_path(choice_key(fields)))
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if (
        not isinstance(record, dict)
        or record.get("fields") != fields
        or (
            record.get("chosen") not in ENGINE_NAMES
            and record.get("chosen") not in (fields.get("reduced") or {})
        )
    ):
        return None
    return record


@dataclass
class Measurement:
    """One engine on one batch: its speed, its setup cost and how far its features are from PyTorch's."""

    engine: str
    images_per_s: float = 0.0
    setup_s: float = 0.0  # the first call: export, compilation, first pass (and the engine's own check)
    difference: float = 0.0  # largest |features - PyTorch's| / largest |PyTorch feature|
    agrees: bool = False
    error: Optional[str] = None


def make_forward(
    engine: str, module: nn.Module, *, threads: Optional[int] = None, reduced: Optional[Factories] = None
) -> Callable:
    """The callable that runs ``module`` in ``engine`` (``torch``: the module itself; a reduced-precision
    engine: from its factory in ``reduced``)."""
    if reduced and engine in reduced:
        return reduced[engine](module, threads=threads)
    if engine == "torch":
        return module
    if engine == "onnx":
        from geoswc.runtime import OnnxForward

        return OnnxForward(module, threads=threads)
    if engine == "openvino":
        from geoswc.engines.openvino import OpenVinoForward

        return OpenVinoForward(module, threads=threads)
    raise choice_error("engine", engine, ENGINE_NAMES)


def measure(
    module: nn.Module,
    pixels: torch.Tensor,
    engines: Optional[Sequence[str]] = None,
    *,
    threads: Optional[int] = None,
    min_rounds: int = MIN_ROUNDS,
    reduced: Optional[Factories] = None,
) -> Tuple[List[Measurement], Dict[str, Callable]]:
    """Time ``engines`` (default: `available_engines`, then the ``reduced`` precision engines) on ``pixels``
    and compare their features with PyTorch's. A reduced-precision engine agrees when it runs (its own
    first-photo guard passed): that its predictions agree is what the model's record says.

    Returns the measurements (in ``engines``' order) and the forwards that work, ready to use (so the chosen
    one does not export again).
    """
    engines = list(engines or available_engines() + list(reduced or {}))
    with torch.inference_mode():
        reference = module(pixels).float()
    scale = float(reference.abs().max().clamp(min=1e-12))
    results = {engine: Measurement(engine) for engine in engines}
    forwards: Dict[str, Callable] = {}
    for engine in engines:
        result = results[engine]
        try:
            forward = make_forward(engine, module, threads=threads, reduced=reduced)
            start = time.perf_counter()
            with torch.inference_mode():
                features = forward(pixels).float()
            result.setup_s = time.perf_counter() - start
            failed = getattr(forward, "failed", None)
            if failed:
                raise RuntimeError(failed)
        except Exception as err:  # noqa: BLE001 - an engine that fails is reported, not chosen
            result.error = f"{type(err).__name__}: {err}".splitlines()[0]
            continue
        result.difference = float((features - reference).abs().max()) / scale
        result.agrees = engine in (reduced or {}) or result.difference <= AGREEMENT_TOLERANCE
        forwards[engine] = forward
    best = {engine: float("inf") for engine in forwards}
    rounds, started = 0, time.perf_counter()
    while (
        forwards
        and rounds < MAX_ROUNDS
        and (rounds < min_rounds or time.perf_counter() - started < MIN_SECONDS)
    ):
        for engine, forward in forwards.items():
            start = time.perf_counter()
            with torch.inference_mode():
                forward(pixels)
            best[engine] = min(best[engine], time.perf_counter() - start)
        rounds += 1
    for engine, seconds in best.items():
        results[engine].images_per_s = len(pixels) / seconds
        if getattr(forwards[engine], "failed", None):  # failed while timed: it ran in PyTorch
            results[engine].error = forwards[engine].failed
            results[engine].agrees = False
    return [results[engine] for engine in engines], forwards


def choose(measurements: Sequence[Measurement]) -> str:
    """The fastest engine that agrees with PyTorch (PyTorch itself when none does)."""
    usable = [m for m in measurements if m.agrees and m.error is None and m.images_per_s > 0]
    return max(usable, key=lambda m: m.images_per_s).engine if usable else "torch"


def format_record(record: Dict[str, Any]) -> str:
    """The measurement as a table, with the machine, the input and the choice."""
    fields = record["fields"]
    box = fields["machine"]
    batch, _, height, width = fields["input"]
    lines = [
        f"machine: {box['cpu']}; ISA: {' '.join(box['isa']) or '-'}; {box['cores']} CPUs, {box['threads']} threads",
        f"input: batch {batch} at {height}x{width}; measured {record.get('measured_at', '?')}",
        f"{'engine':<14} {'version':<12} {'images/s':>9} {'setup s':>8} {'difference':>11}  agrees",
    ]
    for m in record["measurements"]:
        name = engine_label(m["engine"])
        version = fields["versions"].get(m["engine"].split("-")[0]) or "-"
        if m.get("error"):
            lines.append(f"{name:<14} {version:<12} {'-':>9} {'-':>8} {'-':>11}  failed: {m['error']}")
            continue
        agrees = (
            "admitted by the agreement record"
            if m["engine"] in REDUCED_ENGINE_NAMES and m["agrees"]
            else "yes"
            if m["agrees"]
            else f"no (tolerance {AGREEMENT_TOLERANCE:g})"
        )
        lines.append(
            f"{name:<14} {version:<12} {m['images_per_s']:>9.2f} {m['setup_s']:>8.2f} {m['difference']:>11.2e}  {agrees}"
        )
    lines.append(
        f"chosen: {engine_label(record['chosen'])} (the fastest engine that agrees with PyTorch or that "
        "the agreement record admits)"
    )
    return "\n".join(lines)


def measure_and_record(
    module: nn.Module,
    pixels: torch.Tensor,
    *,
    threads: Optional[int] = None,
    fields=None,
    reduced: Optional[Factories] = None,
) -> Tuple[Dict[str, Any], Dict[str, Callable]]:
    """Measure (`measure`), choose (`choose`) and store the record; returns it and the working forwards."""
    fields = fields or choice_fields(module, pixels.shape, reduced)
    measurements, forwards = measure(module, pixels, threads=threads, reduced=reduced)
    record = {
        "fields": fields,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "measurements": [asdict(m) for m in measurements],
        "chosen": choose(measurements),
    }
    if write_atomically(choice_path(choice_key(fields)), json.dumps(record, indent=1).encode()):
        logger.debug("engine choice stored in %s", choice_path(choice_key(fields)))
    return record, forwards


def choice_for(
    module: nn.Module,
    pixels: torch.Tensor,
    *,
    threads: Optional[int] = None,
    remeasure: bool = False,
    reduced: Optional[Factories] = None,
) -> Tuple[Dict[str, Any], Dict[str, Callable], bool]:
    """The record for ``module`` on ``pixels``' shape: the stored one unless ``remeasure`` or there is none
    (then measured now). ``reduced``: the reduced-precision engines the model's agreement record admits.
    Returns the record, the forwards built while measuring, and whether it was stored."""
    fields = choice_fields(module, pixels.shape, reduced)
    record = None if remeasure else load_record(fields)
    if record is not None and record["chosen"] in available_engines() + list(reduced or {}):
        return record, {}, True
    record, forwards = measure_and_record(module, pixels, threads=threads, fields=fields, reduced=reduced)
    return record, forwards, False


class MeasuredForward:
    """``module``'s forward in the engine `choice_for` picks on the first batch (measured on it, or read from the
    cache); every later batch, of any size, runs in that engine.

    Args:
        module: the backbone in evaluation mode, on the CPU.
        threads: the engines' threads (default: PyTorch's).
        reduced: reduced-precision engines the model's agreement record admits (`geoswc.engines.agreement`).
    """

    def __init__(
        self, module: nn.Module, *, threads: Optional[int] = None, reduced: Optional[Factories] = None
    ):
        self.module = module
        self.threads = threads
        self.reduced = dict(reduced or {})
        self.record: Optional[Dict[str, Any]] = None
        self.chosen: Optional[str] = None
        self._forward: Optional[Callable] = None
        self._lock = threading.Lock()

    @property
    def failed(self) -> Optional[str]:
        return getattr(self._forward, "failed", None)

    def _decide(self, pixels: torch.Tensor) -> None:
        try:
            record, forwards, stored = choice_for(
                self.module, pixels, threads=self.threads, reduced=self.reduced
            )
        except Exception as err:  # noqa: BLE001 - a measurement that fails must not break the run
            logger.warning(
                "runtime auto could not measure the engines (%s); running the backbone in PyTorch", err
            )
            self._forward, self.chosen = self.module, "torch"
            return
        chosen = record["chosen"]
        self._forward = forwards.get(chosen) or make_forward(
            chosen, self.module, threads=self.threads, reduced=self.reduced
        )
        self.record, self.chosen = record, chosen
        summary = ", ".join(
            f"{engine_label(m['engine'])} {m['images_per_s']:.1f}"
            + (
                ""
                if m["agrees"] and not m.get("error")
                else " (disagrees)"
                if not m.get("error")
                else " (failed)"
            )
            for m in record["measurements"]
        )
        logger.info(
            "runtime auto: %s, %s (images/s at batch %d, %dx%d: %s)",
            engine_label(chosen),
            "as measured before on this machine" if stored else "measured now",
            *record["fields"]["input"][:1],
            *record["fields"]["input"][2:],
            summary,
        )
        logger.debug("runtime auto measurement:\n%s", format_record(record))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._forward is None:
            with self._lock:
                if self._forward is None:
                    self._decide(pixels)
        return self._forward(pixels)
