"""InfoNCE with a cross-batch memory, ICMR 2021 section 3.3.2 (eq. 3) and 4.2 (tau = 0.05, 4,096 entries).

A batch holds B (query, positive) pairs, two photos of the same fine cell. Every embedding of the batch is an
anchor whose positive is its partner (query <-> positive, both directions by default); its negatives are all
other embeddings of the batch and the entries of the memory, a FIFO of the last ``memory_size`` embeddings
(detached) with their cell labels. An entry from the anchor's own cell is never a negative: it is masked out,
whether it sits in the batch (a padded duplicate pair) or in the memory.

Across processes the embeddings are all-gathered so every rank sees the negatives of the global batch; the
local part keeps its gradient. Every rank computes the same global loss and updates its memory with the same
gathered embeddings, so the memories stay identical without any further communication.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank (rank order); only this rank's slice carries gradient.

    All ranks must pass tensors of the same shape. Without an initialised process group this is the identity.
    """
    world, rank = _world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[rank] = tensor
    return torch.cat(parts)


class InfoNCEWithMemory(nn.Module):
    """Contrastive loss over (query, positive) pairs with same-cell masking and a cross-batch memory.

    Args:
        temperature: Softmax temperature tau (paper: 0.05).
        memory_size: Number of past embeddings kept as extra negatives (paper: 4,096); 0 disables the memory.
        symmetric: When True every positive is also an anchor for its query; when False only queries are.
    """

    def __init__(self, temperature: float = 0.05, memory_size: int = 4096, *, symmetric: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        self.temperature = float(temperature)
        self.memory_size = int(memory_size)
        self.symmetric = bool(symmetric)
        # Allocated on the first batch, when the embedding dimension is known.
        self.register_buffer("memory_embeddings", torch.zeros(0, 0))
        self.register_buffer("memory_labels", torch.full((self.memory_size,), -1, dtype=torch.long))
        self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory_count", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "memory_embeddings"
        saved = state_dict.get(key)
        if saved is not None and saved.shape != self.memory_embeddings.shape:
            # The dimension is known once the memory is allocated; any other row count is a size mismatch.
            if saved.dim() == 2 and (saved.shape[0] == self.memory_size or saved.numel() == 0):
                self.memory_embeddings = torch.zeros_like(saved, device=self.memory_embeddings.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        # A memory from a checkpoint is data: entries it says it holds must be there.
        count, ptr = int(self.memory_count), int(self.memory_ptr)
        rows = self.memory_embeddings.shape[0] if self.memory_embeddings.dim() == 2 else 0
        if not (0 <= count <= self.memory_size and 0 <= ptr < max(self.memory_size, 1)) or (
            count and rows == 0
        ):
            errors.append(
                f"{prefix}memory: {count} entries at slot {ptr} do not fit a memory of {self.memory_size} "
                f"holding {rows} rows"
            )

    def memory(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored entries, oldest first: ``(embeddings (M, D), labels (M,))`` with M <= memory_size."""
        count = int(self.memory_count)
        if count == 0:
            dim = self.memory_embeddings.shape[1] if self.memory_embeddings.dim() == 2 else 0
            return self.memory_embeddings.new_zeros((0, dim)), self.memory_labels[:0]
        if count < self.memory_size:
            return self.memory_embeddings[:count], self.memory_labels[:count]
        order = torch.roll(
            torch.arange(self.memory_size, device=self.memory_labels.device), -int(self.memory_ptr)
        )
        return self.memory_embeddings[order], self.memory_labels[order]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append entries to the FIFO, dropping the oldest beyond ``memory_size``."""
        if self.memory_size == 0:
            return
        embeddings = embeddings.detach()
        if self.memory_embeddings.shape != (self.memory_size, embeddings.shape[1]):
            self.memory_embeddings = embeddings.new_zeros((self.memory_size, embeddings.shape[1]))
        embeddings = embeddings.to(self.memory_embeddings.dtype)
        embeddings, labels = embeddings[-self.memory_size :], labels[-self.memory_size :]
        n = embeddings.shape[0]
        slots = (int(self.memory_ptr) + torch.arange(n, device=self.memory_labels.device)) % self.memory_size
        self.memory_embeddings[slots] = embeddings.to(self.memory_embeddings.device)
        self.memory_labels[slots] = labels.to(self.memory_labels.device, torch.long)
        self.memory_ptr.fill_((int(self.memory_ptr) + n) % self.memory_size)
        self.memory_count.fill_(min(int(self.memory_count) + n, self.memory_size))

    def forward(self, query: torch.Tensor, positive: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE loss of the global batch; updates the memory afterwards when training.

        Args:
            query: Embeddings (B, D), L2-normalised.
            positive: Embeddings (B, D) of the partner photos, same cells as ``query``.
            labels: Fine ``cell_idx`` (B,) of each pair.
        """
        if query.shape != positive.shape or query.dim() != 2 or labels.shape != query.shape[:1]:
            raise ValueError(
                f"expected query and positive (B, D) and labels (B,), got {tuple(query.shape)}, "
                f"{tuple(positive.shape)}, {tuple(labels.shape)}"
            )
        world, _ = _world()
        queries = gather_with_local_grad(query)
        positives = gather_with_local_grad(positive)
        pair_labels = gather_with_local_grad(labels.to(torch.long))
        n = queries.shape[0]

        batch = torch.cat([queries, positives])
        batch_labels = torch.cat([pair_labels, pair_labels])
        anchors = batch if self.symmetric else queries
        anchor_labels = batch_labels[: anchors.shape[0]]
        arange = torch.arange(anchors.shape[0], device=batch.device)
        partner = (arange + n) % (2 * n)

        mem_embeddings, mem_labels = self.memory()
        keys = torch.cat([batch, mem_embeddings.to(batch.dtype)]) if mem_embeddings.shape[0] else batch
        key_labels = torch.cat([batch_labels, mem_labels]) if mem_embeddings.shape[0] else batch_labels

        logits = anchors @ keys.T / self.temperature
        # Same cell (which includes the anchor itself) is never a negative; the partner is the positive.
        excluded = anchor_labels[:, None] == key_labels[None, :]
        excluded[arange, partner] = False
        logits = logits.masked_fill(excluded, float("-inf"))
        loss = (torch.logsumexp(logits, dim=1) - logits[arange, partner]).mean()

        if self.training:
            self.enqueue(batch, batch_labels)
        if world > 1:
            # Each rank back-propagates only through its own slice and DDP averages over ranks; scaling the
            # gradient (not the value) by the world size makes the update equal the single-process gradient
            # of the global batch.
            loss = loss + (world - 1) * (loss - loss.detach())
        return loss
