"""int8 backbones: ONNX Runtime static post-training quantisation (QDQ format, per-channel int8 weights, uint8
activations with min-max ranges) of the exported float32 graph, calibrated on photos of the model's own
background.

Weights use 7 of their 8 bits (ONNX Runtime's ``reduce_range``): x86 CPUs without VNNI multiply uint8 by int8
with an instruction (VPMADDUBSW) whose 16-bit sums saturate for full-range weights, so the same graph would
compute other numbers on them than on VNNI CPUs; with 7-bit weights no sum saturates and the agreement
measured on one machine holds on the others.

The calibration result is a table of activation ranges (tensor name -> lowest, highest value seen). It is kept
in the model folder's agreement record (`geoswc.engines.agreement`), so every machine rebuilds the same
quantised graph from the float32 export and the table, without the photos; the quantised graph itself is kept
in the graph cache beside the float32 one (`geoswc.engines.graphs`).

Schemes (`SCHEMES`), from the most to the least quantised:

- ``int8``: every operator ONNX Runtime quantises (convolutions, the squeeze-excitation products, additions);
- ``int8-edges``: the same, but the stem (the first convolution, which sees the pixels) and the last stage
  with everything after it (the head convolution, the pooling) stay float32;
- ``int8-mixed``: ``int8-edges``, and also the depthwise convolutions and the squeeze-excitation modules in
  float32 (a depthwise kernel has the fewest weights to average the rounding over, and the excitation scales
  every channel at once).

The classification heads and the retrieval module never run here: they stay float32 PyTorch in every scheme.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from geoswc.data.validation import check_choice
from geoswc.data.files import cache_dir
from geoswc.engines.graphs import read_bytes, write_atomically
from geoswc.runtime import OnnxForward

logger = logging.getLogger(__name__)

SCHEMES = ("int8", "int8-edges", "int8-mixed")
# The quantisation settings below, named: part of the cache key and of the agreement record, so a change of
# them is a new graph and a record measured with others admits nothing.
RECIPE = "ort-qdq-minmax-u8-activations-s8-per-channel-7bit-weights-compute-ops"
# The operators quantised: arithmetic only. ONNX Runtime's default list also has the shape operators (Concat,
# Reshape, Slice, Gather, ...), which in timm's TensorFlow-"same" networks compute the padding amounts; quantised
# they turned tf_efficientnet_lite0's features into noise (relative error 1.0 against 0.2 without them).
QUANTIZED_OPS = (
    "Conv",
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "Clip",
    "Relu",
    "Sigmoid",
    "Pad",
    "GlobalAveragePool",
    "AveragePool",
    "MaxPool",
)
# The first-photo guard of a quantised graph: relative L2 distance of its features from PyTorch's. It catches a
# broken graph (wrong ranges, a failed rewrite); whether int8 may run at all is the agreement record's call.
INT8_GUARD = 0.35
Ranges = Dict[str, Tuple[float, float]]
_STAGE = re.compile(r"/blocks\.(\d+)/")


def check_scheme(scheme: str) -> str:
    return check_choice("int8 scheme", scheme, SCHEMES)


def float_nodes(graph: bytes, scheme: str) -> List[str]:
    """The names of the nodes ``scheme`` keeps in float32 in ``graph`` (an ONNX model's bytes).

    In a timm network the stem is every node before the first ``blocks.`` node and the last stage the highest
    ``blocks.N`` with every node after it (the graph's order is topological); in a graph without such names,
    the stem is the first convolution and the last stage starts at the last quarter of the convolutions.
    """
    import onnx

    check_scheme(scheme)
    if scheme == "int8":
        return []
    nodes = list(onnx.load_from_string(graph).graph.node)
    stages = [int(m.group(1)) for node in nodes for m in [_STAGE.search(node.name)] if m]
    if stages:
        first = next(i for i, node in enumerate(nodes) if _STAGE.search(node.name))
        last = f"/blocks.{max(stages)}/"
        tail = next(i for i, node in enumerate(nodes) if last in node.name)
    else:
        convs = [i for i, node in enumerate(nodes) if node.op_type in ("Conv", "MatMul", "Gemm")]
        first = convs[0] + 1 if convs else 0
        tail = convs[(3 * len(convs)) // 4] if convs else len(nodes)
    keep = {node.name for node in nodes[:first] + nodes[tail:]}
    if scheme == "int8-mixed":
        for node in nodes[first:tail]:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if (node.op_type == "Conv" and group > 1) or "/se/" in node.name:
                keep.add(node.name)
    return sorted(name for name in keep if name)


class _Batches:
    """ONNX Runtime's calibration reader over arrays ``(B, 3, H, W)`` float32."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"pixels": np.ascontiguousarray(batch, dtype=np.float32)}


def _preprocessed(graph: bytes, folder: Path) -> Path:
    """``graph`` written to ``folder`` after ONNX Runtime's pre-processing for quantisation (constant folding,
    shape inference), which turns shared bias constants into initializers the quantiser can fold."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    raw, prepared = folder / "float.onnx", folder / "prepared.onnx"
    raw.write_bytes(graph)
    quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True)
    return prepared


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantiser logs advice (pre-processing, bias initializers) on the root logger for every
    graph; those calls are dropped while it runs (the quantiser's errors still raise)."""
    root = logging.getLogger()
    was = root.disabled
    root.disabled = True
    try:
        yield
    finally:
        root.disabled = was


def _quantize(
    graph: bytes, scheme: str, *, batches=None, ranges: Optional[Ranges] = None
) -> Tuple[bytes, Ranges]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, load_tensors_data, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="geoswc-int8-") as folder:
        folder = Path(folder)
        prepared = _preprocessed(graph, folder)
        table = folder / "ranges.json"
        if ranges is not None:
            data = {name: (np.float32(low), np.float32(high)) for name, (low, high) in ranges.items()}
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), table)
        out = folder / "int8.onnx"
        with _quiet_root_logger():
            quantize_static(
                str(prepared),
                str(out),
                None if batches is None else _Batches(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=float_nodes(prepared.read_bytes(), scheme),
                op_types_to_quantize=list(QUANTIZED_OPS),
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(table),
            )
        found = {
            name: (float(np.asarray(low).item()), float(np.asarray(high).item()))
            for name, (low, high) in (
                (name, data.range_value) for name, data in load_tensors_data(table).data.items()
            )
        }
        return out.read_bytes(), found


def calibrate(graph: bytes, batches: Iterable[np.ndarray], scheme: str = "int8") -> Tuple[bytes, Ranges]:
    """Quantise ``graph`` with activation ranges measured on ``batches``; returns the quantised graph and the
    ranges (to rebuild it with `quantize_with_ranges`)."""
    return _quantize(graph, check_scheme(scheme), batches=batches)


def quantize_with_ranges(graph: bytes, ranges: Ranges, scheme: str) -> bytes:
    """``graph`` quantised by ``scheme`` with the activation ranges ``ranges`` measured before (`calibrate`)."""
    return _quantize(graph, check_scheme(scheme), ranges=ranges)[0]


def check_ranges(value, *, source: object) -> Ranges:
    """A ranges table read from a file: ``{tensor name: [lowest, highest]}`` of finite numbers, lowest <=
    highest.

    Raises:
        ValueError: naming ``source`` and what is wrong.
    """
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"{source}: the int8 ranges must be a non-empty object of tensor name -> [low, high]"
        )
    ranges: Ranges = {}
    for name, pair in value.items():
        ok = (
            isinstance(name, str)
            and isinstance(pair, Sequence)
            and len(pair) == 2
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair
            )
            and pair[0] <= pair[1]
        )
        if not ok:
            raise ValueError(f"{source}: int8 range of {str(name)[:80]!r} is not [low, high] finite numbers")
        ranges[name] = (float(pair[0]), float(pair[1]))
    return ranges


def ranges_digest(ranges: Ranges, scheme: str) -> str:
    text = json.dumps({"scheme": scheme, "ranges": sorted(ranges.items())})
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def cached_quantized(graph: bytes, ranges: Ranges, scheme: str) -> bytes:
    """`quantize_with_ranges`, read from the graph cache when an earlier run built the same graph (keyed by the
    float32 graph, the ranges, the scheme, ONNX Runtime's version and `RECIPE`)."""
    import onnxruntime

    digest = hashlib.blake2b(digest_size=16)
    for part in (
        graph,
        ranges_digest(ranges, scheme).encode(),
        onnxruntime.__version__.encode(),
        RECIPE.encode(),
    ):
        digest.update(hashlib.blake2b(part, digest_size=16).digest())
    path = cache_dir() / "graphs" / f"{digest.hexdigest()}.int8.onnx"
    quantized = read_bytes(path)
    if quantized:
        logger.debug("quantised graph read from %s", path)
        return quantized
    quantized = quantize_with_ranges(graph, ranges, scheme)
    if write_atomically(path, quantized):
        logger.debug("quantised graph stored in %s", path)
    return quantized


def graph_ops(graph: bytes) -> Dict[str, int]:
    """How many nodes of each operator type ``graph`` holds."""
    import onnx

    counts: Dict[str, int] = {}
    for node in onnx.load_from_string(graph).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class QuantizedForward(OnnxForward):
    """``module``'s forward through its int8 graph in ONNX Runtime (`geoswc.runtime.OnnxForward`'s graphs per
    input size and fallback to PyTorch), with the first-photo guard loosened to `INT8_GUARD`.

    Args:
        module: the backbone in evaluation mode, on the CPU.
        ranges: the activation ranges (`calibrate`).
        scheme: which operators are quantised (`SCHEMES`).
        threads: ONNX Runtime's threads (default: PyTorch's).
    """

    engine_name = "ONNX Runtime int8"

    def __init__(self, module: nn.Module, ranges: Ranges, scheme: str, *, threads: Optional[int] = None):
        super().__init__(module, threads=threads)
        self.ranges = dict(ranges)
        self.scheme = check_scheme(scheme)

    def _graph(self, example: torch.Tensor, *, dynamic_size: bool) -> bytes:
        return cached_quantized(super()._graph(example, dynamic_size=dynamic_size), self.ranges, self.scheme)

    def _difference(self, features: torch.Tensor, reference: torch.Tensor) -> Tuple[float, float]:
        distance = float(torch.linalg.vector_norm(features - reference))
        return distance, INT8_GUARD * float(torch.linalg.vector_norm(reference).clamp(min=1e-12))
