"""Running one job on N processes: each rank's batches of in-memory rows, gathering per-rank results, keeping
BatchNorm buffers and weights identical across ranks, and a digest that identifies trained weights."""

from __future__ import annotations

import hashlib
from typing import Dict, List, Mapping, Tuple

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn


def rank_batches(
    n: int,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    num_processes: int = 1,
    process_index: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> List[np.ndarray]:
    """This rank's batches of row indices for one epoch over ``n`` in-memory rows.

    The permutation depends only on ``(seed, epoch)``, so every rank agrees on it and a resumed run replays
    the same order. Ranks take interleaved rows and the same number of batches (DDP steps in lock-step).
    ``batch_size`` is per rank.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // num_processes
    mine = order[process_index : per_rank * num_processes : num_processes]
    if not drop_last and per_rank * num_processes < n and process_index < n - per_rank * num_processes:
        mine = np.append(mine, order[per_rank * num_processes + process_index])
    stop = (len(mine) // batch_size) * batch_size if drop_last else len(mine)
    batches = [mine[i : i + batch_size] for i in range(0, stop, batch_size)]
    if drop_last and not batches and len(mine):
        batches = [mine]
    return batches


def gather_rows(accelerator: Accelerator, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Concatenate per-rank rows of every tensor across ranks (``gather_for_metrics``: the samples that
    padding duplicated for the last batch are dropped)."""
    return {k: accelerator.gather_for_metrics(v.contiguous()) for k, v in tensors.items()}


def gather_by_row(
    accelerator: Accelerator, rows: torch.Tensor, values: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather per-rank results of unequal length (e.g. an evaluation split by ``rank_batches`` without
    dropping rows): returns every rank's ``(rows, values)`` concatenated and sorted by row."""
    rows = accelerator.pad_across_processes(rows.to(accelerator.device), dim=0, pad_index=-1)
    values = accelerator.pad_across_processes(values.to(accelerator.device), dim=0)
    rows, values = accelerator.gather(rows), accelerator.gather(values)
    keep = rows >= 0
    rows, values = rows[keep], values[keep]
    order = torch.argsort(rows)
    return rows[order], values[order]


def sync_buffers(accelerator: Accelerator, module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP keeps parameters identical but each rank's last forward updates its own running statistics; syncing
    them at the end of an epoch makes validation, checkpoints and the saved model the same on every rank.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(module).buffers():
        dist.broadcast(buffer.data, src=0)


def ranks_agree(accelerator: Accelerator, module: nn.Module) -> bool:
    """Whether every rank holds the same weights (a float64 checksum per tensor, compared across ranks)."""
    module = accelerator.unwrap_model(module)
    sums = torch.stack(
        [p.detach().double().sum() for p in module.state_dict().values() if p.is_floating_point()]
    ).to(accelerator.device)
    everyone = accelerator.gather(sums[None]).reshape(accelerator.num_processes, -1)
    return bool((everyone == everyone[0]).all())


def weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights (about 0.1 s for EfficientNet-B4): what identifies a trained model in
    the key of work derived from it."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digest.update(b"\0")
    return digest.hexdigest()
