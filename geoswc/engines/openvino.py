"""OpenVINO as the backbone's engine on the CPU (AMD and Intel): the graph ONNX Runtime gets (the same in-memory
export, cached by `geoswc.engines.graphs`) compiled by OpenVINO's CPU plugin, with the same first-photo check
against PyTorch and the same fallback (`geoswc.runtime.OnnxForward`).

The precision is explicit: ``f32`` (the default) is float32 arithmetic everywhere, also on CPUs where OpenVINO
would otherwise pick bfloat16 by itself (AMX); ``bf16`` asks for bfloat16 where the CPU has it natively
(`native_bf16`).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Optional, Tuple

import torch
from torch import nn

from geoswc.data.validation import check_choice
from geoswc.runtime import OnnxForward

PACKAGES = ("openvino", "onnx")
PRECISIONS = ("f32", "bf16")
# bfloat16 keeps 8 bits of mantissa, so its first photo is held to a guard that catches a broken graph (relative
# L2 distance from PyTorch's features), not to float32's tolerance; the agreement record decides whether it runs.
BF16_GUARD = 0.1


@functools.lru_cache(maxsize=1)
def missing_packages() -> Tuple[str, ...]:
    """The packages runtime ``openvino`` needs that are not installed (empty when it can run); ``onnx`` is
    what the export writes the graph with."""
    return tuple(name for name in PACKAGES if importlib.util.find_spec(name) is None)


@functools.lru_cache(maxsize=1)
def core():
    import openvino

    return openvino.Core()


def capabilities() -> Tuple[str, ...]:
    """OpenVINO's CPU plugin's optimisation capabilities (``FP32``, ``BF16``, ``INT8``, ...)."""
    return tuple(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def native_bf16() -> bool:
    """Whether OpenVINO runs bfloat16 natively on this CPU (AVX-512 BF16 or AMX)."""
    return "BF16" in capabilities()


def version() -> str:
    import openvino

    return str(openvino.__version__).split("-")[0]


class OpenVinoForward(OnnxForward):
    """``module``'s forward through OpenVINO on the CPU; see `geoswc.runtime.OnnxForward` for the graphs per
    input size, the agreement check and the fallback to PyTorch.

    Args:
        module: the backbone in evaluation mode, on the CPU.
        threads: OpenVINO's inference threads (default: PyTorch's).
        precision: ``f32`` or ``bf16`` (`PRECISIONS`).
    """

    engine_name = "OpenVINO"

    def __init__(self, module: nn.Module, *, threads: Optional[int] = None, precision: str = "f32"):
        check_choice("OpenVINO precision", precision, PRECISIONS)
        super().__init__(module, threads=threads)
        self.precision = precision
        self._requests = threading.local()

    def _difference(self, features: torch.Tensor, reference: torch.Tensor) -> Tuple[float, float]:
        if self.precision == "f32":
            return super()._difference(features, reference)
        distance = float(torch.linalg.vector_norm(features - reference))
        return distance, BF16_GUARD * float(torch.linalg.vector_norm(reference).clamp(min=1e-12))

    def _open(self, graph: bytes):
        model = core().read_model(graph, b"")
        config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        return core().compile_model(model, "CPU", config)

    def _infer(self, compiled, array):
        # One infer request per compiled graph and thread: a request is not shared between threads.
        requests = self._requests.__dict__.setdefault("by_graph", {})
        request = requests.get(id(compiled))
        if request is None or request[0] is not compiled:
            request = requests[id(compiled)] = (compiled, compiled.create_infer_request())
        request[1].infer({0: array})
        return request[1].get_output_tensor(0).data.copy()
