"""Residual Retrieval Module (RRM), ICMR 2021 section 3.3.1 and Fig. 2.

The module maps a backbone feature ``z`` (D) to an embedding on the unit sphere of the same dimension:

    x = LayerNorm(z)
    y = LayerNorm(x + Linear(D_h -> D)(ReLU(Linear(D -> D_h)(x))))
    out = y / ||y||

The paper says the feed-forward output "is added with the input feature vector" and that feature vectors are
normalised with LayerNorm "before and after the residual connection". We add the first-LayerNorm'd input ``x``,
not the raw ``z``: the vector entering the residual connection is the normalised one, so both branches of the
sum live on the same scale (raw GAP features of a CNN are non-negative with a per-image scale), as in the
pre-norm Transformer feed-forward block the paper cites as its inspiration. ``residual_input="raw"`` builds
the other reading for comparison.

Two ablations of the paper's section 5.2 are built here as well: ``residual=False`` drops the skip connection
(``y = LayerNorm(Linear(ReLU(Linear(x))))``, Table 3 "w/o residual"), and `IdentityEmbedding` uses the backbone
features themselves, L2-normalised, as the embeddings (Table 2 "baseline": no retrieval module, no training).
Both kinds are saved as ``retrieval.safetensors`` and told apart by its ``architecture`` metadata;
`load_retrieval` loads either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from geoswc.data.files import load_safetensors_weights, read_safetensors_metadata
from geoswc.data.validation import check_choice

RESIDUAL_INPUTS = ("normalized", "raw")
# The ``architecture`` metadata of a retrieval weights file; files written before it existed are "residual".
ARCHITECTURES = ("residual", "identity")


class ResidualRetrievalModule(nn.Module):
    """Two-layer residual feed-forward projection followed by LayerNorm and L2 normalisation.

    Args:
        dim: Input and output dimension D (the backbone's pooled feature size).
        hidden_dim: Hidden size D_h of the feed-forward block (paper: 4096).
        residual: Add the skip connection (the paper's module); False gives the "w/o residual" network of
            Table 3, ``LayerNorm(Linear(ReLU(Linear(x))))``.
        residual_input: Which vector the feed-forward output is added to: ``"normalized"`` (the first
            LayerNorm's output, default) or ``"raw"`` (the backbone feature itself).
    """

    identity = False

    def __init__(
        self, dim: int, hidden_dim: int = 4096, *, residual: bool = True, residual_input: str = "normalized"
    ) -> None:
        super().__init__()
        if dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"dim and hidden_dim must be positive, got dim={dim}, hidden_dim={hidden_dim}")
        check_choice("residual_input", residual_input, RESIDUAL_INPUTS)
        self.dim = int(dim)
        self.hidden_dim = int(hidden_dim)
        self.residual = bool(residual)
        self.residual_input = residual_input
        self.norm_in = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.dim:
            raise ValueError(
                f"expected features with last dimension {self.dim}, got shape {tuple(features.shape)}"
            )
        x = self.norm_in(features)
        out = self.fc2(F.relu(self.fc1(x)))
        if self.residual:
            out = (x if self.residual_input == "normalized" else features) + out
        return F.normalize(self.norm_out(out), dim=-1)

    def embed(self, features, *, batch_size: int = 8192, device: Union[str, torch.device, None] = None):
        """Embed an array of features (N, D) in batches; numpy in -> float32 numpy out, tensor in -> tensor out.

        Reads ``features`` slice by slice, so a memory-mapped cache larger than RAM works.
        """
        device = torch.device(device) if device is not None else next(self.parameters()).device
        return _embed_in_batches(self, features, batch_size=batch_size, device=device)

    def save(
        self, path: Union[str, Path], *, fingerprint: str, extra: Optional[Dict[str, str]] = None
    ) -> None:
        """Write the weights as safetensors with ``dim``, ``hidden_dim`` and the partition fingerprint."""
        metadata = {
            "kind": "retrieval",
            "architecture": "residual",
            "dim": str(self.dim),
            "hidden_dim": str(self.hidden_dim),
            "residual": "true" if self.residual else "false",
            "residual_input": self.residual_input,
            "fingerprint": str(fingerprint),
        }
        metadata.update({k: str(v) for k, v in (extra or {}).items()})
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata=metadata)

    @classmethod
    def load(
        cls, path: Union[str, Path], *, fingerprint: Optional[str] = None, map_location: str = "cpu"
    ) -> ResidualRetrievalModule:
        """Load a module saved with `save`.

        Raises:
            FileNotFoundError: the file is missing.
            ValueError: the file is not a retrieval module's safetensors, holds the identity embedding (load it
                with `load_retrieval`), its metadata is malformed, its tensors do not fit the recorded
                ``dim``/``hidden_dim`` (the file and the tensor named), or ``fingerprint`` is given and differs
                from the file's.
        """
        path = Path(path)
        metadata = _checked_metadata(path, fingerprint)
        if _architecture(metadata, path) != "residual":
            raise ValueError(
                f"{path} holds the identity embedding (retrieval.loss=none), not a residual retrieval module; "
                "load it with geoswc.retrieval.load_retrieval"
            )
        residual = metadata.get("residual", "true")
        if residual not in ("true", "false"):
            raise ValueError(f"{path}: metadata residual must be 'true' or 'false', got {residual!r}")
        sizes = {}
        for key in ("dim", "hidden_dim"):
            try:
                sizes[key] = int(metadata.get(key, ""))
            except ValueError:
                sizes[key] = 0
            if sizes[key] <= 0:
                raise ValueError(
                    f"{path}: metadata {key} must be a positive integer, got {metadata.get(key)!r}"
                )
        try:
            module = cls(
                sizes["dim"],
                sizes["hidden_dim"],
                residual=residual == "true",
                residual_input=metadata.get("residual_input", "normalized"),
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        load_safetensors_weights(
            module,
            path,
            describe=f"a retrieval module of dim {sizes['dim']}, hidden_dim {sizes['hidden_dim']}",
            device=map_location,
        )
        module.fingerprint = metadata.get("fingerprint")
        return module


class IdentityEmbedding(nn.Module):
    """The backbone features themselves, L2-normalised, as retrieval embeddings (``retrieval.loss=none``).

    The paper's baseline of Table 2: "the features extracted from the CNN are directly used for retrieval
    without the application of the retrieval module or any further training". It has no weights; its file
    records only ``dim`` and the partition fingerprint, so a model folder holds it like a trained module.

    Args:
        dim: The backbone's pooled feature size D.
    """

    identity = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got dim={dim}")
        self.dim = int(dim)
        self.hidden_dim = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.dim:
            raise ValueError(
                f"expected features with last dimension {self.dim}, got shape {tuple(features.shape)}"
            )
        return F.normalize(features, dim=-1)

    def embed(self, features, *, batch_size: int = 8192, device: Union[str, torch.device, None] = None):
        """As `ResidualRetrievalModule.embed`: L2-normalised rows, numpy in -> float32 numpy out."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        return _embed_in_batches(self, features, batch_size=batch_size, device=device)

    def save(
        self, path: Union[str, Path], *, fingerprint: str, extra: Optional[Dict[str, str]] = None
    ) -> None:
        """Write a safetensors file without tensors whose metadata says ``architecture: identity``."""
        metadata = {
            "kind": "retrieval",
            "architecture": "identity",
            "dim": str(self.dim),
            "fingerprint": str(fingerprint),
        }
        metadata.update({k: str(v) for k, v in (extra or {}).items()})
        save_file({}, str(path), metadata=metadata)

    @classmethod
    def load(
        cls, path: Union[str, Path], *, fingerprint: Optional[str] = None, **_: Any
    ) -> IdentityEmbedding:
        """Load a file written by `save`.

        Raises:
            FileNotFoundError: the file is missing.
            ValueError: the file is not an identity embedding's, its ``dim`` is not a positive integer, it holds
                tensors, or ``fingerprint`` is given and differs from the file's.
        """
        path = Path(path)
        metadata = _checked_metadata(path, fingerprint)
        if _architecture(metadata, path) != "identity":
            raise ValueError(f"{path} holds a trained retrieval module, not the identity embedding")
        try:
            dim = int(metadata.get("dim", ""))
        except ValueError:
            dim = 0
        if dim <= 0:
            raise ValueError(f"{path}: metadata dim must be a positive integer, got {metadata.get('dim')!r}")
        if load_file(str(path)):
            raise ValueError(f"{path}: the identity embedding has no weights, but the file holds tensors")
        module = cls(dim)
        module.fingerprint = metadata.get("fingerprint")
        return module


RetrievalModule = Union[ResidualRetrievalModule, IdentityEmbedding]


def load_retrieval(
    path: Union[str, Path], *, fingerprint: Optional[str] = None, map_location: str = "cpu"
) -> RetrievalModule:
    """The retrieval part saved at ``path``: a `ResidualRetrievalModule` or the `IdentityEmbedding`, as its
    ``architecture`` metadata says (errors as their ``load``)."""
    metadata = _checked_metadata(Path(path), fingerprint)
    if _architecture(metadata, Path(path)) == "identity":
        return IdentityEmbedding.load(path, fingerprint=fingerprint)
    return ResidualRetrievalModule.load(path, fingerprint=fingerprint, map_location=map_location)


@torch.no_grad()
def _embed_in_batches(module: nn.Module, features, *, batch_size: int, device: torch.device):
    was_training = module.training
    module.eval()
    as_numpy = not isinstance(features, torch.Tensor)
    outputs = []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        chunk = torch.as_tensor(np.asarray(chunk)) if as_numpy else chunk
        out = module(chunk.to(device=device, dtype=torch.float32))
        outputs.append(out.cpu().numpy() if as_numpy else out)
    module.train(was_training)
    if as_numpy:
        return np.concatenate(outputs) if outputs else np.zeros((0, module.dim), np.float32)
    return torch.cat(outputs) if outputs else features.new_zeros((0, module.dim), dtype=torch.float32)


def _checked_metadata(path: Path, fingerprint: Optional[str]) -> Dict[str, str]:
    """The metadata of a retrieval weights file, checked for its kind and (when given) its partition."""
    if not path.is_file():
        raise FileNotFoundError(f"retrieval module weights not found: {path}")
    metadata = read_metadata(path)
    if metadata.get("kind") != "retrieval":
        raise ValueError(f"{path} is not a retrieval module (kind={metadata.get('kind')!r})")
    if fingerprint is not None and metadata.get("fingerprint") != fingerprint:
        raise ValueError(
            f"retrieval module {path} was trained on partition {metadata.get('fingerprint')!r}, "
            f"but the model uses partition {fingerprint!r}"
        )
    return metadata


def _architecture(metadata: Dict[str, str], path: Path) -> str:
    architecture = metadata.get("architecture", "residual")
    check_choice("retrieval architecture", architecture, ARCHITECTURES, source=path)
    return architecture


def read_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The metadata of retrieval weights (``dim``, ``hidden_dim``, ``fingerprint``, …; errors as
    `geoswc.data.files.read_safetensors_metadata`)."""
    return read_safetensors_metadata(path, what="retrieval module weights")
