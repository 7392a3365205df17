"""The fastest correct inference settings for each machine: numeric precision, memory layout, ``torch.compile``
and the number of decoding processes.

``precision_mode`` chooses the dtype the backbone runs in; the classification heads and the retrieval module
always run in float32 on the float32 copy of the backbone's features (they are a few matrix products, and
their softmax and normalisation are where half precision would lose most):

- ``fp32``: everything in float32 (on CUDA, cuDNN's TF32 convolutions are turned off too);
- ``bf16``: the backbone under bfloat16 autocast;
- ``fp16``: the backbone under float16 autocast;
- ``auto`` (default): float16 on CUDA GPUs, float32 on CPUs and other devices.

``auto`` picks only what meets the agreement rule with ``fp32`` (the top-1 cell of >= 99.5 % of photos and the
coordinates within 1 km for >= 99 %), measured by ``benchmarks/bench_precision.py`` on the demo's trained model
(docs/performance.md): float16 keeps 100 % of the cells, bfloat16 (8 bits of mantissa against float16's 11)
only 97.3 %, so bfloat16 runs only when asked for. On a CPU without native bfloat16 (no AVX-512 BF16 or AMX)
it is emulated and several times slower than float32 as well, and a warning says so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from typing import Callable, FrozenSet, Optional, Union

import torch
from torch import nn

from geoswc.data.validation import check_choice

logger = logging.getLogger(__name__)

PRECISION_MODES = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "on", "off")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags (Linux /proc/cpuinfo names) of processors that compute bfloat16 natively.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
MAX_DEFAULT_WORKERS = 32


@functools.lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """The instruction-set flags of this machine's processor (``/proc/cpuinfo``); empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(flags: Optional[FrozenSet[str]] = None) -> bool:
    """Whether the processor computes bfloat16 natively (AVX-512 BF16 or AMX; ``flags`` default: this one's)."""
    flags = cpu_flags() if flags is None else flags
    return bool(BF16_CPU_FLAGS & set(flags))


def check_precision_mode(mode: str) -> str:
    """``mode`` if it is a known precision mode.

    Raises:
        ValueError: naming the mode and the valid choices.
    """
    return check_choice("precision mode", mode, PRECISION_MODES)


def resolve_dtype(mode: str, device: Union[str, torch.device]) -> torch.dtype:
    """The dtype the backbone runs in for ``mode`` on ``device``.

    Raises:
        ValueError: an unknown mode, or ``bf16`` on a CUDA GPU without bfloat16.
    """
    check_precision_mode(mode)
    device = torch.device(device)
    if device.type == "cuda":
        if mode == "auto":
            return torch.float16
        if mode == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"precision mode 'bf16' needs a GPU with bfloat16; {torch.cuda.get_device_name(device)} has "
                "none: choose fp16, fp32 or auto"
            )
        return _DTYPES[mode]
    if device.type == "cpu":
        if mode == "auto":
            return torch.float32
        if mode == "bf16" and not cpu_has_native_bf16():
            _warn_emulated_bf16()
        return _DTYPES[mode]
    # MPS and other devices: float32 unless asked otherwise.
    return torch.float32 if mode == "auto" else _DTYPES[mode]


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    """Once per process: bfloat16 asked for on a CPU that emulates it."""
    logger.warning(
        "precision mode 'bf16' on a CPU without native bfloat16 (%s): it is emulated and slower than fp32",
        platform.processor() or platform.machine(),
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16`` or ``fp16``."""
    return {value: key for key, value in _DTYPES.items()}[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """The context the backbone runs in: autocast to ``dtype``, or for float32 no autocast (and no TF32
    convolutions on CUDA, so ``fp32`` is float32 throughout)."""
    if dtype == torch.float32:
        if device.type == "cuda":
            return torch.backends.cudnn.flags(
                enabled=torch.backends.cudnn.enabled,
                benchmark=torch.backends.cudnn.benchmark,
                deterministic=torch.backends.cudnn.deterministic,
                allow_tf32=False,
            )
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def use_compile(mode: Union[str, bool, None], device: Union[str, torch.device]) -> bool:
    """Whether to compile the backbone: ``auto`` (or None) compiles on CUDA only.

    On CPU, compiling EfficientNet-B4 took minutes on a 2-core machine for a 1.9x faster forward
    (docs/performance.md): it pays only on long runs, so it is asked for explicitly (``on``).

    Raises:
        ValueError: an unknown mode.
    """
    if isinstance(mode, bool):
        return mode
    mode = "auto" if mode is None else mode
    check_choice("compile mode", mode, COMPILE_MODES)
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "on"


class CompiledForward:
    """``module``'s forward through ``torch.compile``, falling back to eager (with a warning, once) when
    compiling or running the compiled graph fails, so compiling never breaks a run.

    Args:
        module: the network (kept as it is; it is what is saved and what the fallback runs).
        compile_fn: the compiler (``torch.compile``); ``options`` are passed to it.
    """

    def __init__(self, module: nn.Module, *, compile_fn: Optional[Callable] = None, **options):
        self.module = module
        self.failed: Optional[str] = None
        compile_fn = torch.compile if compile_fn is None else compile_fn
        try:
            self.compiled = compile_fn(module, **options)
        except Exception as err:  # noqa: BLE001 - any failure means: run eager
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        self.failed = f"{type(err).__name__}: {err}".splitlines()[0]
        self.compiled = None
        logger.warning("torch.compile failed (%s); running the backbone eager", self.failed)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(pixels)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure means: run eager
                self._fail(err)
        return self.module(pixels)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_batch_size(device) -> int:
    """Photos per model call for inference on ``device``: 64 on a GPU; 8 on a CPU, where larger batches of
    300 px photos outgrow the caches (EfficientNet-B4 at 300x400, channels_last, 2 AVX2 cores: 3.95 images/s
    at batch 1, 3.84 at 8, 2.75 at 32; docs/performance.md)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 64 if torch.device(device).type == "cuda" else 8


def default_workers(device=None) -> int:
    """Decoding processes for a run on ``device`` (default: CUDA when available, else the CPU).

    On a GPU the decoders are the bottleneck (a core decodes and resizes about 1,000 photos/s at 300 px), so
    they get every usable CPU but the model's process, at most 32. On a CPU the backbone's threads use every
    core and decoding is about a tenth of its work, so one decoder per 8 CPUs, none below 8: a decoding process
    on a 2-core machine took a core from the backbone (EfficientNet-B4 at 300 px in ONNX Runtime: 5.7 images/s
    end to end with 1 worker, 6.8 with decoding in the main process; docs/performance.md).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cpus = usable_cpus()
    if torch.device(device).type == "cpu":
        return min(MAX_DEFAULT_WORKERS, cpus // 8)
    return max(0, min(MAX_DEFAULT_WORKERS, cpus - 1))
