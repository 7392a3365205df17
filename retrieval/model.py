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
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

RESIDUAL_INPUTS = ("normalized", "raw")


class ResidualRetrievalModule(nn.Module):
    """Two-layer residual feed-forward projection followed by LayerNorm and L2 normalisation.

    Args:
        dim: Input and output dimension D (the backbone's pooled feature size).
        hidden_dim: Hidden size D_h of the feed-forward block (paper: 4096).
        residual_input: Which vector the feed-forward output is added to: ``"normalized"`` (the first
            LayerNorm's output, default) or ``"raw"`` (the backbone feature itself).
    """

    def __init__(self, dim: int, hidden_dim: int = 4096, *, residual_input: str = "normalized") -> None:
        super().__init__()
        if dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"dim and hidden_dim must be positive, got dim={dim}, hidden_dim={hidden_dim}")
        if residual_input not in RESIDUAL_INPUTS:
            raise ValueError(
                f"unknown residual_input {residual_input!r}; choose one of: {', '.join(RESIDUAL_INPUTS)}"
            )
        self.dim = int(dim)
        self.hidden_dim = int(hidden_dim)
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
        residual = x if self.residual_input == "normalized" else features
        y = self.norm_out(residual + self.fc2(F.relu(self.fc1(x))))
        return F.normalize(y, dim=-1)

    @torch.no_grad()
    def embed(self, features, *, batch_size: int = 8192, device: Union[str, torch.device, None] = None):
        """Embed an array of features (N, D) in batches; numpy in -> float32 numpy out, tensor in -> tensor out.

        Reads ``features`` slice by slice, so a memory-mapped cache larger than RAM works.
        """
        device = torch.device(device) if device is not None else next(self.parameters()).device
        was_training = self.training
        self.eval()
        as_numpy = not isinstance(features, torch.Tensor)
        outputs = []
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            chunk = torch.as_tensor(np.asarray(chunk)) if as_numpy else chunk
            out = self(chunk.to(device=device, dtype=torch.float32))
            outputs.append(out.cpu().numpy() if as_numpy else out)
        self.train(was_training)
        if as_numpy:
            return np.concatenate(outputs) if outputs else np.zeros((0, self.dim), np.float32)
        return torch.cat(outputs) if outputs else features.new_zeros((0, self.dim), dtype=torch.float32)

    def save(
        self, path: Union[str, Path], *, fingerprint: str, extra: Optional[Dict[str, str]] = None
    ) -> None:
        """Write the weights as safetensors with ``dim``, ``hidden_dim`` and the partition fingerprint."""
        metadata = {
            "kind": "retrieval",
            "dim": str(self.dim),
            "hidden_dim": str(self.hidden_dim),
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
            ValueError: the file is not a retrieval module's safetensors, its metadata is malformed, its
                tensors do not fit the recorded ``dim``/``hidden_dim`` (the file and the tensor named), or
                ``fingerprint`` is given and differs from the file's.
        """
        path = Path(path)
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
                residual_input=metadata.get("residual_input", "normalized"),
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        try:
            module.load_state_dict(load_file(str(path), device=map_location))
        except (RuntimeError, SafetensorError) as err:
            detail = " ".join(str(err).split())
            raise ValueError(
                f"{path}: the tensors do not fit a retrieval module of dim {sizes['dim']}, hidden_dim "
                f"{sizes['hidden_dim']}: {detail}"
            ) from None
        module.fingerprint = metadata.get("fingerprint")
        return module


def read_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The safetensors metadata of a weights file (``dim``, ``hidden_dim``, ``fingerprint``, …).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a safetensors file (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"retrieval module weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
