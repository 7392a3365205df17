"""Which runtime executes the backbone at inference: PyTorch, or ONNX Runtime or OpenVINO on the CPU.

On CPUs, ONNX Runtime's convolution kernels run EfficientNet about twice as fast as PyTorch's eager
channels_last path (EfficientNet-B4 at 300 x 400 on 2 AVX2 cores: 11.3 against 5.2 images/s at batch 1;
docs/performance.md), with the same float32 arithmetic: features agree with PyTorch's within about 1e-6
(relative), so predictions do not change. The network is exported from the loaded weights in memory
(``torch.onnx.export``, a few seconds for B4) when the first batch arrives, and kept in the cache folder by
model fingerprint and input size (`geoswc.engines.graphs`), so a later run reads it instead of exporting.

- ``torch``: the backbone runs in PyTorch (with the precision mode and ``torch.compile`` of `geoswc.precision`);
- ``onnx``: ONNX Runtime's CPU provider, float32 (needs the ``onnxruntime`` and ``onnx`` packages);
- ``openvino``: OpenVINO's CPU plugin, float32, from the same exported graph (`geoswc.engines.openvino`; needs
  the ``openvino`` and ``onnx`` packages);
- ``auto`` (default): on the CPU in float32, not compiled, with ONNX Runtime or OpenVINO installed, the engine
  that a measurement on the first batch finds fastest among those that agree with PyTorch, stored per machine
  and model (`geoswc.engines.choice`); ``torch`` otherwise (GPUs: PyTorch's float16 and ``torch.compile``).

Every exported graph is checked against PyTorch on the first photo of each new input shape; a graph that
disagrees, or any failure to export or run, sends the backbone back to PyTorch with one warning, so the
runtime never changes a prediction and never breaks a run.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import threading
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from geoswc.data.validation import check_choice

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx", "openvino")
# The engines besides PyTorch that run a float32 backbone on the CPU.
CPU_ENGINES = ("onnx", "openvino")
# How the log names a runtime other than torch.
RUNTIME_LABELS = {"onnx": "ONNX Runtime", "openvino": "OpenVINO", "auto": "the engine measured fastest"}
ONNX_PACKAGES = ("onnxruntime", "onnx")
# Largest |ONNX - PyTorch| difference accepted on the check photo, relative to the largest |feature|.
AGREEMENT_TOLERANCE = 1e-3
# Graphs exported for a model whose padding depends on the input size (one per size); photos of further sizes
# run in PyTorch, so an archive of many odd sizes never spends its time exporting.
MAX_GRAPHS = 16
ONNX_OPSET = 17
# Below this many photos ``auto`` runs PyTorch as it is (`few_photos_settings`).
FEW_PHOTOS = 64


@functools.lru_cache(maxsize=1)
def missing_onnx_packages() -> Tuple[str, ...]:
    """The packages runtime ``onnx`` needs that are not installed (empty when it can run)."""
    return tuple(name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None)


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is a known runtime.

    Raises:
        ValueError: naming the runtime and the valid choices.
    """
    return check_choice("runtime", runtime, RUNTIMES)


def missing_packages(runtime: str) -> Tuple[str, ...]:
    """The packages the CPU engine ``runtime`` (``onnx``, ``openvino``) needs that are not installed."""
    if runtime == "openvino":
        from geoswc.engines.openvino import missing_packages as missing_openvino

        return missing_openvino()
    return missing_onnx_packages()


def resolve_runtime(
    runtime: str, device: Union[str, torch.device], dtype: torch.dtype, *, compiled: bool = False
) -> str:
    """The runtime the backbone runs in for ``runtime`` (`RUNTIMES`) on ``device``, in ``dtype``, compiled or
    not: ``torch``, ``onnx``, ``openvino``, or ``auto`` where a measurement on the first batch chooses among
    PyTorch and the installed CPU engines (`geoswc.engines.choice`; a float32 backbone on the CPU, not compiled).

    Raises:
        ValueError: an unknown runtime, or ``onnx``/``openvino`` asked for where it cannot run (not on the CPU,
            not float32, with ``torch.compile``, or without its packages); the message says what to change.
    """
    check_runtime(runtime)
    device = torch.device(device)
    if runtime == "torch":
        return "torch"
    if runtime in CPU_ENGINES:
        if device.type != "cpu":
            raise ValueError(
                f"runtime {runtime!r} runs the backbone on the CPU, but the model is on {device}; use runtime "
                "torch (or auto) there"
            )
        if dtype != torch.float32:
            raise ValueError(
                f"runtime {runtime!r} runs in float32, but the precision mode asks for "
                f"{str(dtype).replace('torch.', '')}; use precision mode fp32 or auto"
            )
        if compiled:
            raise ValueError(f"runtime {runtime!r} and compile 'on' exclude each other; choose one")
        missing = missing_packages(runtime)
        if missing:
            raise ValueError(
                f"runtime {runtime!r} needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}"
            )
        return runtime
    usable = device.type == "cpu" and dtype == torch.float32 and not compiled
    return "auto" if usable and any(not missing_packages(name) for name in CPU_ENGINES) else "torch"


def engine_forward(runtime: str, module: nn.Module, *, reduced=None):
    """The forward that runs ``module`` in the resolved ``runtime`` (`resolve_runtime`; not ``torch``);
    ``reduced``: the reduced-precision engines ``auto`` may time (`geoswc.engines.agreement.reduced_engines`)."""
    if runtime == "onnx":
        return OnnxForward(module)
    if runtime == "openvino":
        from geoswc.engines.openvino import OpenVinoForward

        return OpenVinoForward(module)
    from geoswc.engines.choice import MeasuredForward

    return MeasuredForward(module, reduced=reduced)


def few_photos_settings(
    photos: int, *, runtime: str = "auto", compile: Union[str, bool, None] = "auto"
) -> Tuple[str, Union[str, bool, None]]:
    """``runtime`` and ``compile`` for a run of ``photos`` photos: below `FEW_PHOTOS`, ``auto`` means plain
    PyTorch (runtime ``torch``, compile ``off``); what was asked for by name stays as it is.

    An engine's fixed cost is paid before its first photo: on a later run, loading ONNX Runtime or OpenVINO,
    building the session from the cached graph and checking the first photo against PyTorch (one PyTorch
    forward pass anyway); on the first run of a model on a machine, also exporting the graph and timing every
    engine for at least a second (`geoswc.engines.choice`); ``torch.compile`` on a GPU takes tens of seconds.
    An engine twice as fast as PyTorch saves half of PyTorch's time per photo (EfficientNet-B4 at 300 px on 2
    AVX2 cores: about 0.1 s, docs/performance.md), so a run of fewer than 64 photos would spend on the setup
    about what it saves; a one-photo run only loses. The measurement waits for a run large enough to earn it.
    """
    if photos >= FEW_PHOTOS:
        return runtime, compile
    return ("torch" if runtime == "auto" else runtime), ("off" if compile in ("auto", None) else compile)


def has_input_dependent_padding(module: nn.Module) -> bool:
    """Whether ``module`` pads some layer by an amount computed from each input's size (timm's TensorFlow
    "same" layers: ``Conv2dSame``, ``MaxPool2dSame``, ...). Such amounts are fixed for one size when the network
    is exported, so these networks get one graph per input size."""
    return any(type(layer).__name__.endswith("Same") for layer in module.modules())


def _export(module: nn.Module, example: torch.Tensor, *, dynamic_size: bool) -> bytes:
    """The ONNX graph of ``module`` (input ``pixels`` NCHW float32, output ``features``), batch size dynamic,
    height and width too when ``dynamic_size``."""
    import onnx  # noqa: F401 - torch.onnx.export needs it; imported here to fail early with its name

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # Tracing warns about every Python-level shape computation; the per-size check covers them.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example.clone(),),
            buffer,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": axes, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def _session(graph: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: the decoding workers need those cores between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class GraphMismatch(RuntimeError):
    """An exported graph computed other features than the PyTorch network."""


class OnnxForward:
    """``module``'s forward (pixels ``(B, 3, H, W)`` -> pooled features ``(B, D)``) through ONNX Runtime on the
    CPU, falling back to ``module`` with one warning if exporting, checking or running fails.

    One graph with dynamic height and width serves every input size, unless the network's padding depends on
    the size (`has_input_dependent_padding`): then one graph per size for the first `MAX_GRAPHS` sizes, and
    PyTorch for the sizes after them (most archives have a handful: landscape and portrait). The first
    photo of each new size is also run through ``module`` and the two must agree (`AGREEMENT_TOLERANCE`).

    Args:
        module: the backbone in evaluation mode, on the CPU (kept as it is: the check and the fallback run it).
        threads: ONNX Runtime's threads (default: PyTorch's, ``torch.get_num_threads()``).
    """

    def __init__(self, module: nn.Module, *, threads: Optional[int] = None):
        self.module = module
        self.threads = int(threads or torch.get_num_threads())
        self.per_size = has_input_dependent_padding(module)
        self.failed: Optional[str] = None
        self._sessions: Dict[Optional[Tuple[int, int]], object] = {}
        self._full_logged = False
        self._checked: set = set()
        self._lock = threading.Lock()  # the server calls from several threads
        self.exports: List[Optional[Tuple[int, int]]] = []

    engine_name = "ONNX Runtime"

    def _graph(self, example: torch.Tensor, *, dynamic_size: bool) -> bytes:
        """The ONNX graph of the module for ``example``'s size (`geoswc.engines.graphs` keeps one per model
        fingerprint and input size on disk, so a later run does not export again)."""
        from geoswc.engines.graphs import cached_export

        return cached_export(self.module, example, dynamic_size=dynamic_size, export=_export)

    def _open(self, graph: bytes):
        return _session(graph, self.threads)

    def _infer(self, session, array):
        return session.run(None, {"pixels": array})[0]

    def _difference(self, features: torch.Tensor, reference: torch.Tensor) -> Tuple[float, float]:
        """The first-photo check: the largest difference from PyTorch's features, and the largest allowed
        (`AGREEMENT_TOLERANCE` of the largest feature)."""
        scale = float(reference.abs().max().clamp(min=1e-12))
        return float((features - reference).abs().max()), AGREEMENT_TOLERANCE * scale

    def _fail(self, err: BaseException) -> None:
        self.failed = f"{type(err).__name__}: {err}".splitlines()[0]
        self._sessions.clear()
        logger.warning("%s backbone failed (%s); running it in PyTorch", self.engine_name, self.failed)

    def _graph_for(self, pixels: torch.Tensor):
        """The session for ``pixels``' size, exported on first use; None for a size beyond `MAX_GRAPHS`."""
        size = (int(pixels.shape[2]), int(pixels.shape[3]))
        key = size if self.per_size else None
        session = self._sessions.get(key)
        if session is None:
            if len(self._sessions) >= MAX_GRAPHS:
                if not self._full_logged:
                    logger.info(
                        "%d input sizes have ONNX graphs; photos of further sizes run in PyTorch", MAX_GRAPHS
                    )
                    self._full_logged = True
                return None
            graph = self._graph(pixels[:1], dynamic_size=not self.per_size)
            session = self._open(graph)
            self.exports.append(key)
            logger.info(
                "backbone exported to %s (%s)",
                self.engine_name,
                f"for {size[0]}x{size[1]} inputs" if self.per_size else "any input size",
            )
            self._sessions[key] = session
        return session

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        size = (int(pixels.shape[2]), int(pixels.shape[3]))
        with self._lock:
            session = self._graph_for(pixels)
            checked = size in self._checked
        if session is None:
            return self.module(pixels)
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        features = torch.from_numpy(self._infer(session, array))
        if not checked:
            reference = self.module(pixels[:1]).float()
            difference, allowed = self._difference(features[:1], reference)
            if not difference <= allowed:
                raise GraphMismatch(
                    f"the exported graph's features differ from PyTorch's by {difference:.3g} (allowed "
                    f"{allowed:.3g}) at {size[0]}x{size[1]}"
                )
            with self._lock:
                self._checked.add(size)
        return features

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                return self._run(pixels)
            except GraphMismatch as err:
                if not self.per_size:
                    # A size-dependent computation the layer names did not reveal: one graph per size.
                    logger.info("%s; exporting one graph per input size instead", err)
                    self.per_size = True
                    self._sessions.clear()
                    self._checked.clear()
                    try:
                        return self._run(pixels)
                    except Exception as again:  # noqa: BLE001 - any failure means: run in PyTorch
                        self._fail(again)
                else:
                    self._fail(err)
            except Exception as err:  # noqa: BLE001 - any failure means: run in PyTorch
                self._fail(err)
        return self.module(pixels)
