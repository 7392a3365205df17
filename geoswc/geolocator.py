"""The Geolocator: one object that turns photos into coordinates (ICMR 2021, Figure 1 and section 3.4).

It composes the trained parts: a timm backbone (pooled features), the classification heads (CE, HC, MvMF), the
residual retrieval module, the background index and the Earth partition (`Geocells`), and saves/loads them as
one model folder (layout in docs/architecture.md). Three ways to place a photo:

- ``cell``: the head's own prediction (centre of the best fine cell, or the MvMF mean);
- ``swc``: Search within Cell: the K most similar background photos inside the head's best cell, DBSCAN,
  mean of the largest cluster; photos whose cell holds no background photo fall back to ``cell``;
- ``rrm``: the position of the most similar background photo anywhere (global retrieval).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from geoswc import __version__  # noqa: F401
from geoswc.classifiers import load_backbone, load_head, save_backbone, save_head  # noqa: F401
from geoswc.classifiers.backbone import BACKBONE_JSON_FILE, BACKBONE_WEIGHTS_FILE  # noqa: F401
from geoswc.classifiers.aggregation import (
    RETRIEVAL_POOL_FILE,
    TwoPoolBackbone,
    aggregation_dim,
    load_retrieval_pool,
)
from geoswc.classifiers.heads import read_head_metadata
from geoswc.config import Config
from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.data.sphere import EARTH_RADIUS_KM  # noqa: F401
from geoswc.data.transforms import build_transform
from geoswc.folder_checks import naming, read_folder_config, refuse_outside_links
from geoswc.geocells import Geocells
from geoswc.precision import (
    CompiledForward,
    autocast,
    check_precision_mode,
    dtype_name,
    resolve_dtype,
    use_compile,
)
from geoswc.runtime import RUNTIME_LABELS, OnnxForward, engine_forward, resolve_runtime
from geoswc.street.locator import is_street_model
from geoswc.street.predictor import StreetGeolocator
from geoswc.retrieval.index import INDEX_FILES, BackgroundIndex, index_files  # noqa: F401
from geoswc.retrieval.model import load_retrieval, read_metadata
from geoswc.swc import nearest_background, search_within_cell  # noqa: F401

# Names defined here before the prediction path, the area filter and the model folder's writing moved to
# modules of their own; still importable from here.
from geoswc.area_filter import cells_in_area  # noqa: F401
from geoswc.composition import check_fingerprints, check_index_partitions, check_parts_fit
from geoswc.model_folder import (  # noqa: F401
    _check_head_partitions,
    _check_part,
    _check_recorded,
    _head_names,
    _read_meta,
    _recorded_path,
    _verify_checksums,
    _HASH_CHUNK,
    FORMAT_VERSION,
    META_FILE,
    _jsonable,
    _part_files,
    _sha256,
    remove_stale_parts,
    save_model_folder,
)
from geoswc.placing import (  # noqa: F401
    CONFIDENCE_RADIUS_KM,
    MODES,
    Predictions,
    classify,
    density_neighbour_table,
    near_cells,
    search_background,
    unclassified,
)
from geoswc.data.validation import check_choice

logger = logging.getLogger(__name__)

# Preferred head when the caller names none: the paper's best system first (Table 1: MvMF + Search within
# Cell), then CE (PlaNet), then HC.
HEAD_PREFERENCE = ("mvmf", "ce", "hc")

ImageInput = Union[str, Path, Image.Image, np.ndarray]


class Geolocator(nn.Module):
    """Backbone, heads, retrieval module, background index and partition, composed for inference.

    Args:
        backbone: timm model created with ``num_classes=0`` (returns pooled features).
        geocells: the partition the heads, the retrieval module and the index were built on.
        heads: ``{kind: head}`` classification heads (``ce``, ``hc``, ``mvmf``).
        retrieval: the residual retrieval module (needed by ``swc`` and ``rrm``).
        index: the `BackgroundIndex` (needed by ``swc`` and ``rrm``).
        config: the resolved configuration (Search within Cell settings, image size).
        backbone_name: the timm model name, saved so the folder can be rebuilt.
        data_config: the backbone's timm data config (mean, std, interpolation); resolved from the model when
            omitted.
        retrieval_pool: a GeM or NetVLAD layer (``backbone.pool``) whose descriptors of the backbone's feature
            map the retrieval module embeds; the heads keep the average-pooled features. `features` then returns
            both side by side (`geoswc.classifiers.aggregation.TwoPoolBackbone`).

    Raises:
        ValueError: when a head, the retrieval module or the index was built on another partition.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        geocells: Any,
        heads: Optional[Mapping[str, nn.Module]] = None,
        retrieval: Optional[nn.Module] = None,
        index: Any = None,
        config: Optional[Config] = None,
        backbone_name: Optional[str] = None,
        data_config: Optional[Dict[str, Any]] = None,
        retrieval_pool: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.retrieval_pool = retrieval_pool
        self._two_pool = None
        self.heads = nn.ModuleDict(dict(heads or {}))
        self.retrieval = retrieval
        self.index = index
        self.geocells = geocells
        self.config = config if config is not None else Config()
        self.backbone_name = backbone_name or getattr(backbone, "default_cfg", {}).get("architecture", "")
        if data_config is None:
            data_config = timm.data.resolve_model_data_config(backbone)
        self.data_config = dict(data_config)
        self._transform = None
        # Inference speed settings (`optimize`): precision mode, memory layout, compiled forward.
        self.precision_mode = "auto"
        self._channels_last = False
        self.runtime = "torch"
        # The model folder it was loaded from: its agreement record admits reduced precisions (`optimize`).
        self.folder: Optional[Path] = None
        self._backbone_forward: Union[CompiledForward, OnnxForward, None] = None
        self._density_neighbours: Dict[str, Dict[int, np.ndarray]] = {}
        self._check_fingerprints()
        self._check_index_partitions()
        self.eval()

    @classmethod
    def from_parts(
        cls,
        *,
        backbone: nn.Module,
        geocells: Any,
        heads: Optional[Mapping[str, nn.Module]] = None,
        retrieval: Optional[nn.Module] = None,
        index: Any = None,
        config: Optional[Config] = None,
        backbone_name: Optional[str] = None,
        data_config: Optional[Dict[str, Any]] = None,
        sources: Optional[Mapping[str, Any]] = None,
        retrieval_pool: Optional[nn.Module] = None,
    ) -> "Geolocator":
        """The one way to compose a Geolocator from loaded parts (a model folder, ``geoswc assemble``, an
        import): the parts are checked against each other, then composed.

        Besides the partition checks of the constructor (every part built on ``geocells``; every head's
        partition searchable in the index), the heads and the retrieval module must take the backbone's
        feature width and the index must hold embeddings of the retrieval module's width.

        Args:
            backbone, geocells, heads, retrieval, index, config, backbone_name, data_config, retrieval_pool: as
                the constructor.
            sources: where the parts were read from, to name in errors: ``backbone`` (its weights file),
                ``heads`` (``{kind: file}``), ``retrieval`` (its file), ``index`` (its folder).

        Raises:
            ValueError: the parts do not fit together (the part, its source and both values named).
        """
        retrieval_width = None
        if retrieval_pool is not None:
            retrieval_width = aggregation_dim(retrieval_pool, int(backbone.num_features))
        check_parts_fit(
            backbone,
            heads=heads,
            retrieval=retrieval,
            index=index,
            sources=sources,
            retrieval_width=retrieval_width,
        )
        return cls(
            backbone=backbone,
            geocells=geocells,
            heads=heads,
            retrieval=retrieval,
            index=index,
            config=config,
            backbone_name=backbone_name,
            data_config=data_config,
            retrieval_pool=retrieval_pool,
        )

    # ------------------------------------------------------------------ composition checks and properties
    @property
    def fingerprint(self) -> str:
        return str(self.geocells.fingerprint)

    @property
    def feature_width(self) -> int:
        """Width of `features`: the backbone's, plus the retrieval pool's descriptor when there is one."""
        return int(self._forward_module().num_features)

    def _forward_module(self) -> nn.Module:
        """What runs on the pixels: the backbone, or the backbone with both poolings (a retrieval pool)."""
        if self.retrieval_pool is None:
            return self.backbone
        if self._two_pool is None:
            # Not a registered submodule: its parameters are the backbone's and the pool's.
            self.__dict__["_two_pool"] = TwoPoolBackbone(self.backbone, self.retrieval_pool)
        return self._two_pool

    def head_features(self, features: torch.Tensor) -> torch.Tensor:
        """The columns of `features` the heads take (all of them without a retrieval pool)."""
        return features if self.retrieval_pool is None else features[:, : int(self.backbone.num_features)]

    def retrieval_features(self, features: torch.Tensor) -> torch.Tensor:
        """The columns of `features` the retrieval module takes (all of them without a retrieval pool)."""
        return features if self.retrieval_pool is None else features[:, int(self.backbone.num_features) :]

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def head_names(self) -> List[str]:
        return list(self.heads.keys())

    def _check_fingerprints(self) -> None:
        check_fingerprints(self)

    def head_partition(self, kind: str):
        """The `Partition` whose cells head ``kind`` predicts (its finest; the cells' finest for heads saved
        before a model could hold several partitions)."""
        name = getattr(self.heads[kind], "partition", None)
        return self.geocells.fine if name is None else self.geocells.partition(name)

    def _index_partition(self) -> str:
        """The partition the index rows are sorted by (an unnamed index: the cells' finest)."""
        return self.index.partition or self.geocells.fine.name

    def _check_index_partitions(self) -> None:
        check_index_partitions(self)

    def resolve_head(self, head: Optional[str] = None) -> str:
        """The head to use: ``head`` if given, else the first available of mvmf, ce, hc."""
        if head is None:
            for kind in HEAD_PREFERENCE:
                if kind in self.heads:
                    return kind
            if self.heads:
                return next(iter(self.heads))
            raise ValueError("this model has no classification head; use mode='rrm'")
        if head not in self.heads:
            choices = ", ".join(self.heads) or "(none)"
            raise ValueError(f"unknown head {head!r}; this model has: {choices}")
        return head

    @property
    def transform(self):
        """The evaluation transform (PIL image -> normalised tensor) from the backbone's data config."""
        if self._transform is None:
            self._transform = build_transform(
                self.data_config,
                train=False,
                size=self.config.data.image_size,
                eval_resize=self.config.data.eval_resize,
            )
        return self._transform

    # ------------------------------------------------------------------ forward passes
    def _autocast(self):
        """The context of the heads and the retrieval module: float32 in every precision mode (they take the
        float32 copy of the features; their softmax and normalisation are where half precision loses most)."""
        return contextlib.nullcontext()

    def optimize(
        self,
        *,
        precision_mode: str = "auto",
        compile: Union[str, bool, None] = "auto",
        runtime: str = "auto",
    ) -> "Geolocator":
        """Set the inference speed settings (`geoswc.precision`) on the device the model is on.

        The backbone moves to channels_last and runs in the dtype of ``precision_mode`` (``auto``: float16 on
        CUDA, float32 elsewhere; ``fp32`` is the exact path; ``bf16``, ``fp16``); the heads and the retrieval
        module stay float32. A batch whose reduced-precision features are not finite (float16 overflow) is
        run again in float32. ``compile`` (``auto``: on CUDA only,
        ``on``, ``off``) wraps the backbone in ``torch.compile``, falling back to eager with a warning if
        compiling fails. ``runtime`` (`geoswc.runtime`; ``auto``: ONNX Runtime for a float32 backbone on the
        CPU when installed, else PyTorch; ``torch``; ``onnx``) chooses what executes the backbone.

        Raises:
            ValueError: an unknown precision mode, compile mode or runtime, ``bf16`` on a GPU without bfloat16,
                or runtime ``onnx`` where it cannot run.
        """
        self.precision_mode = check_precision_mode(precision_mode)
        dtype = resolve_dtype(precision_mode, self.device)
        compiled = use_compile(compile, self.device)
        self.runtime = resolve_runtime(runtime, self.device, dtype, compiled=compiled)
        self.backbone.to(memory_format=torch.channels_last)
        self._channels_last = True
        if self.runtime == "auto":
            reduced = None
            # The agreement record measures the backbone's precisions; a folder with a retrieval pool runs
            # the backbone and both poolings as one graph, which the record does not cover.
            if self.folder is not None and self.retrieval_pool is None:
                from geoswc.engines.agreement import reduced_engines

                reduced = reduced_engines(self.folder, self.backbone)
            self._backbone_forward = engine_forward(self.runtime, self._forward_module(), reduced=reduced)
        elif self.runtime != "torch":
            self._backbone_forward = engine_forward(self.runtime, self._forward_module())
        else:
            self._backbone_forward = CompiledForward(self._forward_module()) if compiled else None
        logger.info(
            "inference on %s: backbone in %s, %s",
            self.device,
            dtype_name(dtype),
            RUNTIME_LABELS.get(self.runtime)
            if self.runtime != "torch"
            else ("compiled" if compiled else "eager, channels_last"),
        )
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the backbone runs in (from ``precision_mode`` and the device)."""
        return resolve_dtype(self.precision_mode, self.device)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, D)`` float32 of a batch of transformed images ``(B, 3, H, W)``, the
        backbone run in `compute_dtype`; with a retrieval pool, ``(B, C + D')``: the average-pooled features,
        then the pool's descriptor (`head_features`, `retrieval_features`)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must have shape (B, 3, H, W), got {tuple(pixels.shape)}")
        pixels = pixels.to(self.device, non_blocking=True)
        if self._channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        forward = self._backbone_forward or self._forward_module()
        dtype = self.compute_dtype
        with torch.inference_mode(), autocast(self.device, dtype):
            features = forward(pixels).float()
        if dtype != torch.float32 and not bool(torch.isfinite(features).all()):
            logger.warning(
                "%s features overflowed for a batch; it is run again in float32", dtype_name(dtype)
            )
            with torch.inference_mode(), autocast(self.device, torch.float32):
                features = self._forward_module()(pixels).float()
        return features

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Retrieval embeddings ``(B, D)`` (L2-normalised) of backbone features.

        For a model trained with ``retrieval.loss=none`` (its retrieval part is the `IdentityEmbedding`) the
        embeddings are the features themselves, L2-normalised in float32.
        """
        if self.retrieval is None:
            raise ValueError("this model has no retrieval module; modes 'swc' and 'rrm' need one")
        features = self.retrieval_features(features)
        if getattr(self.retrieval, "identity", False):
            with torch.inference_mode():
                return self.retrieval(features.to(self.device, torch.float32))
        with torch.inference_mode(), self._autocast():
            return self.retrieval(features.to(self.device)).float()

    def density_neighbours(
        self, partition: Optional[str] = None, cells: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """``(n, M)`` cells whose centres lie within 25 km of each cell's centre, ascending, -1 padded, for
        ``cells`` (default: every cell) of ``partition`` (default: the finest). Answers are kept, so a run
        computes each cell's neighbours once."""
        part = self.geocells.fine if partition is None else self.geocells.partition(partition)
        known = self._density_neighbours.setdefault(part.name, {})
        return near_cells(part.centers_deg, range(len(part)) if cells is None else cells, known)

    def _classify(
        self, features: torch.Tensor, kind: str, n_top: int, area: Optional[Sequence[float]] = None
    ) -> Dict[str, np.ndarray]:
        return classify(self, features, kind, n_top, area)

    def locate(
        self,
        features: torch.Tensor,
        *,
        head: Optional[str] = None,
        mode: str = "swc",
        k: Optional[int] = None,
        eps_km: Optional[float] = None,
        min_samples: Optional[int] = None,
        top_cells: Optional[int] = None,
        top_k: int = 5,
        embeddings: Optional[torch.Tensor] = None,
        area: Optional[Sequence[float]] = None,
    ) -> Predictions:
        """Place photos from their backbone features.

        Args:
            features: ``(B, D)`` pooled backbone features (`features`).
            head: ``ce``, ``hc`` or ``mvmf``; default: the first available of mvmf, ce, hc. Search within Cell
                searches the cells of the head's own partition.
            mode: ``swc``, ``cell`` or ``rrm``.
            k, eps_km, min_samples, top_cells: Search within Cell settings; default: the model's config.
            top_k: how many best cells to report.
            embeddings: retrieval embeddings of ``features`` when already computed (saves a forward pass).
            area: ``(south, west, north, east)`` degrees: only the cells whose centres lie in this box compete
                (`cells_in_area`; ``west > east`` crosses the antimeridian). Needs a head.
        """
        check_choice("mode", mode, MODES)
        swc_cfg = self.config.swc
        k = swc_cfg.k if k is None else int(k)
        eps_km = swc_cfg.eps_km if eps_km is None else float(eps_km)
        min_samples = swc_cfg.min_samples if min_samples is None else int(min_samples)
        top_cells = swc_cfg.top_cells if top_cells is None else int(top_cells)
        if top_cells < 1:
            raise ValueError(f"top_cells must be >= 1, got {top_cells}")
        n = len(features)
        kind = self.resolve_head(head) if (mode != "rrm" or head is not None or self.heads) else None
        if area is not None and kind is None:
            raise ValueError("area needs a classification head; mode 'rrm' without a head cannot use it")
        cls = (
            self._classify(features, kind, max(top_k, top_cells), area)
            if kind is not None
            else unclassified(n)
        )
        latlon, method = cls["latlon"].copy(), np.full(n, "cell", dtype=object)
        rows = np.full((n, 0), -1, np.int64)
        sims = np.full((n, 0), np.nan, np.float32)
        in_cluster = np.zeros((n, 0), bool)
        if mode in ("swc", "rrm"):
            latlon, method, rows, sims, in_cluster = search_background(
                self,
                features,
                cls,
                kind=kind,
                mode=mode,
                k=k,
                eps_km=eps_km,
                min_samples=min_samples,
                top_cells=top_cells,
                embeddings=embeddings,
            )
        top_k = min(top_k, cls["top_cells"].shape[1])
        return Predictions(
            latlon_deg=latlon,
            method=method,
            cell_idx=cls["cell_idx"],
            cell_prob=cls["cell_prob"],
            top_cells=cls["top_cells"][:, :top_k],
            top_probs=cls["top_probs"][:, :top_k],
            confidence=cls["confidence"],
            neighbour_rows=rows,
            neighbour_sims=sims,
            neighbour_in_cluster=in_cluster,
            head=kind,
            mode=mode,
        )

    def predict_from_features(self, features: torch.Tensor, **options: Any) -> List[Dict[str, Any]]:
        """One dict per photo (see `Predictions.to_records`) from backbone features; options as `locate`."""
        return self.locate(features, **options).to_records(self)

    def predict_batch(self, pixels: torch.Tensor, **options: Any) -> List[Dict[str, Any]]:
        """One dict per photo from a batch of transformed images ``(B, 3, H, W)``; options as `locate`."""
        return self.predict_from_features(self.features(pixels), **options)

    def load_pixels(self, image: ImageInput) -> torch.Tensor:
        """A photo (path, PIL image or ``(H, W, 3)`` uint8 array) decoded and transformed to ``(3, H, W)``.

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: the photo cannot be read (the reason is in the message).
        """
        return self._dataset([image])[0][1]

    def _dataset(self, images: Sequence[ImageInput]) -> PhotoDataset:
        for image in images:
            # A FIFO or device exists but is no regular file: reading it says so ("not a regular file").
            if isinstance(image, (str, Path)) and not Path(image).is_file():
                if not os.path.exists(image) or os.path.isdir(image):
                    raise FileNotFoundError(f"image not found: {image}")
        return PhotoDataset(list(images), self.transform)

    def predict(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        *,
        head: Optional[str] = None,
        mode: str = "swc",
        batch_size: int = 32,
        workers: int = 0,
        progress: bool = False,
        **options: Any,
    ) -> List[Dict[str, Any]]:
        """Locate photos given as paths, PIL images or ``(H, W, 3)`` uint8 arrays; one dict per photo, in input
        order (`Predictions.to_records`).

        Photos whose transformed sizes differ (the paper resizes the longest side only) are batched by shape
        (`geoswc.data.photos`), so a photo's prediction does not depend on the other photos of the call.

        Args:
            images: the photos (one, or a sequence).
            head, mode, **options: as `locate`.
            batch_size: photos per forward pass.
            workers: decoding processes (0: decode in this process).
            progress: show a progress bar.

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: a file is not a readable image (its reason named), or a bad head/mode.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, (str, Path, Image.Image, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        dataset = self._dataset(images)
        results: List[Optional[Dict[str, Any]]] = [None] * len(dataset)
        with tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress) as bar:
            for batch in photo_batches(dataset, batch_size=batch_size, workers=workers):
                if batch.errors:
                    first = min(batch.errors)
                    raise ValueError(f"{dataset.describe(first)}: {batch.errors[first]}")
                records = self.predict_batch(batch.pixels, head=head, mode=mode, **options)
                for i, record in zip(batch.indices.tolist(), records):
                    results[i] = record
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ model folder
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write the model folder (layout in docs/architecture.md).

        ``geolocator.json`` records the SHA-256 of every part written (``"sha256": {relative path: digest}``),
        which `from_pretrained` checks.
        """
        return save_model_folder(self, directory)

    def _remove_stale_parts(self, directory: Path) -> None:
        """Remove parts an earlier save left in ``directory`` that this model does not have."""
        remove_stale_parts(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: Union[str, Path],
        *,
        device: Union[str, torch.device, None] = None,
        precision_mode: str = "auto",
        compile: Union[str, bool, None] = "auto",
        runtime: str = "auto",
    ) -> "Geolocator":
        """Load a model folder written by `save_pretrained`, validated completely before it is used.

        A folder written by ``geoswc vpr index`` (``vpr.json``, ``vpr_index/``, ``photos.csv``, no
        ``geolocator.json``) loads as a `StreetGeolocator`: the same predictor surface, placing photos by
        their database matches (docs/place-recognition.md).

        Before any part is parsed, a symbolic link leading out of the folder is refused and every file is
        checked against the SHA-256 recorded at save time, so a part swapped for another built on the same
        cells is refused too (`geoswc.folder_checks`). Then every part is checked against the others: file
        names stay inside the folder, the cells' centres and counts are in range, the heads are the kinds
        their files are named after and listed in ``geolocator.json``, the backbone's feature width matches
        the heads' and the retrieval module's, the index covers exactly the fine cells with monotonic offsets,
        one cell, position and id per row, and embeddings as wide as the retrieval module's. A folder saved
        before checksums existed loads with a warning.

        Args:
            directory: the model folder.
            device: where the networks run; default CUDA when available, else CPU.
            precision_mode: ``auto``, ``fp32``, ``bf16`` or ``fp16``: the backbone's dtype (`optimize`).
            compile: ``auto`` (CUDA only), ``on`` or ``off``: ``torch.compile`` the backbone (`optimize`).
            runtime: ``auto``, ``torch`` or ``onnx``: what executes the backbone (`optimize`, `geoswc.runtime`).

        Raises:
            FileNotFoundError: the folder or one of its required files is missing.
            ValueError: a part was built on another partition than ``cells/`` (both fingerprints named), or a
                file is malformed, out of range, inconsistent with the others, outside the folder, not
                recorded, or changed since it was saved; the message names the file and what is wrong.
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file() and is_street_model(directory):
            return StreetGeolocator.from_pretrained(directory, device=device)  # type: ignore[return-value]
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a geoswc model folder (no geolocator.json): {directory}")
        refuse_outside_links(directory)
        meta = _read_meta(meta_path)
        _verify_checksums(directory, meta)  # before any part is parsed
        config = read_folder_config(directory / "config.yaml")
        with naming(directory / "cells"):
            geocells = Geocells.load(directory / "cells")
        fingerprint = str(geocells.fingerprint)
        _check_part(meta.get("fingerprint"), fingerprint, meta_path)

        backbone, backbone_info = load_backbone(directory, expected_fingerprint=fingerprint)
        width = int(backbone_info["num_features"])
        retrieval_pool, retrieval_width = None, width
        pool_file = directory / RETRIEVAL_POOL_FILE
        if pool_file.is_file():
            retrieval_pool = load_retrieval_pool(pool_file, channels=width)
            retrieval_width = aggregation_dim(retrieval_pool, width)
        elif meta.get("retrieval_pool"):
            raise FileNotFoundError(f"{meta_path} lists a retrieval pool, but {pool_file} is missing")

        heads = {}
        for kind in _head_names(directory, meta, meta_path):
            path = directory / "heads" / f"{kind}.safetensors"
            head_meta = read_head_metadata(path)
            _check_part(head_meta.get("fingerprint"), fingerprint, path)
            if head_meta.get("kind") != kind:
                raise ValueError(
                    f"{path} holds a {head_meta.get('kind')!r} head, but its file name says {kind!r}; "
                    "a head's file is named after its kind"
                )
            heads[kind] = load_head(path, geocells=geocells)
            if heads[kind].in_features != width:
                raise ValueError(
                    f"{path}: the head takes {heads[kind].in_features} features, but the backbone "
                    f"({directory / BACKBONE_WEIGHTS_FILE}) gives {width}"
                )
            _check_head_partitions(meta, kind, heads[kind].partitions, meta_path, path)

        retrieval = None
        retrieval_file = directory / "retrieval.safetensors"
        if retrieval_file.is_file():
            _check_part(read_metadata(retrieval_file).get("fingerprint"), fingerprint, retrieval_file)
            retrieval = load_retrieval(retrieval_file, fingerprint=fingerprint)
            if retrieval.dim != retrieval_width:
                given = f"the backbone ({directory / BACKBONE_WEIGHTS_FILE}) gives {width}"
                if retrieval_pool is not None:
                    given = f"{pool_file} gives {retrieval_width}"
                raise ValueError(
                    f"{retrieval_file}: the retrieval module takes features of dim {retrieval.dim}, but {given}"
                )
        elif meta.get("retrieval"):
            raise FileNotFoundError(f"{meta_path} lists a retrieval module, but {retrieval_file} is missing")

        index = None
        index_dir = directory / "index"
        if index_dir.is_dir():
            with naming(index_dir):
                index = BackgroundIndex.load(index_dir)
            _check_part(getattr(index, "fingerprint", None), fingerprint, index_dir)
            for name, n_cells in index.partitions.items():
                own = name is None or name == index.partition
                where = index_dir / ("offsets.npy" if own else f"partition_{name}_offsets.npy")
                if name is not None and name not in geocells.names:
                    raise ValueError(
                        f"{index_dir / 'index.json'}: partition {name!r} is not one of the cells/ partitions "
                        f"({', '.join(geocells.names)})"
                    )
                part = geocells.fine if name is None else geocells.partition(name)
                if n_cells != len(part):
                    raise ValueError(
                        f"{where}: the index has {n_cells} cells, but cells/ has {len(part)} "
                        f"{'fine cells' if name is None else f'cells in {name}'}"
                    )
            if retrieval is not None and index.dim != retrieval.dim:
                raise ValueError(
                    f"{index_dir / 'embeddings.npy'}: embeddings of dim {index.dim}, but the retrieval "
                    f"module ({retrieval_file}) gives dim {retrieval.dim}"
                )
        elif meta.get("index"):
            raise FileNotFoundError(f"{meta_path} lists a background index, but {index_dir} is missing")

        _check_recorded(
            directory,
            meta,
            _part_files(
                directory,
                heads=list(heads),
                retrieval=retrieval is not None,
                index=index is not None,
                retrieval_pool=retrieval_pool is not None,
            ),
        )

        model = cls.from_parts(
            backbone=backbone,
            geocells=geocells,
            heads=heads,
            retrieval=retrieval,
            index=index,
            config=config,
            backbone_name=backbone_info["model"],
            data_config=backbone_info.get("data_config"),
            retrieval_pool=retrieval_pool,
        )
        device = torch.device(device) if device is not None else _default_device()
        model.to(device)
        model.folder = directory
        model.optimize(precision_mode=precision_mode, compile=compile, runtime=runtime)
        logger.info(
            "loaded geolocator from %s: backbone %s, heads %s, retrieval %s, index %s, on %s",
            directory,
            model.backbone_name,
            model.head_names,
            retrieval is not None,
            index is not None,
            device,
        )
        return model


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
