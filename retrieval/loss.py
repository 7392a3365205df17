"""Contrastive losses with a cross-batch memory, ICMR 2021 section 3.3.2 (eq. 3), 4.2 and the ablations of 5.2.

A batch holds B (query, positive) pairs, two photos of the same fine cell. Every embedding of the batch is an
anchor whose positive is its partner (query <-> positive, both directions by default; ``symmetric=False``
makes only the queries anchors); its negatives are all other embeddings of the batch and the entries of the
memory, a FIFO of the last ``memory_size`` embeddings (detached) with their cell labels. By default an entry
from the anchor's own cell is never a negative: it is masked out, whether it sits in the batch (a padded
duplicate pair) or in the memory; ``mask_same_cell=False`` keeps such false negatives (only the anchor itself
is left out).

`InfoNCEWithMemory` is the paper's loss (eq. 3, tau = 0.05, 4,096 entries). `TripletWithMemory` is the
triplet loss of its Table 2 (margin 0.01 with semi-hard mining, as in FaceNet, Schroff et al. 2015): per
anchor, the most similar negative that is still less similar than the positive, or the least similar negative
when every one is more similar; loss ``max(0, s_neg - s_pos + margin)`` on cosine similarities (a distance of
``1 - s``).

Across processes the embeddings are all-gathered so every rank sees the negatives of the global batch; the
local part keeps its gradient. Every rank computes the same global loss and updates its memory with the same
gathered embeddings, so the memories stay identical without any further communication.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn

from geoswc.data.validation import choice_error

# ``retrieval.loss``: "none" trains nothing (the backbone features are the embeddings).
RETRIEVAL_LOSSES = ("infonce", "triplet", "none")


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


class PairLossWithMemory(nn.Module):
    """What the pair losses share: the anchors, their keys (batch and memory), which keys are negatives, and
    the cross-batch memory. A subclass defines `pair_loss`.

    Args:
        memory_size: Number of past embeddings kept as extra negatives; 0 disables the memory.
        symmetric: When True every positive is also an anchor for its query; when False only queries are.
        mask_same_cell: When True, keys from the anchor's own cell are never negatives.
    """

    def __init__(
        self, memory_size: int = 4096, *, symmetric: bool = True, mask_same_cell: bool = True
    ) -> None:
        super().__init__()
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        self.memory_size = int(memory_size)
        self.symmetric = bool(symmetric)
        self.mask_same_cell = bool(mask_same_cell)
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

    def pair_loss(
        self, similarities: torch.Tensor, not_negative: torch.Tensor, partner: torch.Tensor
    ) -> torch.Tensor:
        """The loss of every anchor ``(A,)``.

        Args:
            similarities: ``(A, K)`` inner products of the anchors with the keys (batch, then memory).
            not_negative: ``(A, K)`` True where a key is no negative of the anchor (the partner included).
            partner: ``(A,)`` the column of each anchor's positive.
        """
        raise NotImplementedError

    def forward(self, query: torch.Tensor, positive: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of the global batch; updates the memory afterwards when training.

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

        similarities = anchors @ keys.T
        if self.mask_same_cell:
            # Same cell (which includes the anchor itself) is never a negative; the partner is the positive.
            not_negative = anchor_labels[:, None] == key_labels[None, :]
        else:
            not_negative = torch.zeros_like(similarities, dtype=torch.bool)
            not_negative[arange, arange] = True  # the anchor itself
        not_negative[arange, partner] = False
        loss = self.pair_loss(similarities, not_negative, partner).mean()

        if self.training:
            self.enqueue(batch, batch_labels)
        if world > 1:
            # Each rank back-propagates only through its own slice and DDP averages over ranks; scaling the
            # gradient (not the value) by the world size makes the update equal the single-process gradient
            # of the global batch.
            loss = loss + (world - 1) * (loss - loss.detach())
        return loss


class InfoNCEWithMemory(PairLossWithMemory):
    """InfoNCE (eq. 3) over (query, positive) pairs with same-cell masking and a cross-batch memory.

    Args:
        temperature: Softmax temperature tau (paper: 0.05).
        memory_size: Number of past embeddings kept as extra negatives (paper: 4,096); 0 disables the memory.
        symmetric: When True every positive is also an anchor for its query; when False only queries are.
        mask_same_cell: When True (the paper), keys from the anchor's own cell are never negatives.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        memory_size: int = 4096,
        *,
        symmetric: bool = True,
        mask_same_cell: bool = True,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(memory_size, symmetric=symmetric, mask_same_cell=mask_same_cell)
        self.temperature = float(temperature)

    def pair_loss(
        self, similarities: torch.Tensor, not_negative: torch.Tensor, partner: torch.Tensor
    ) -> torch.Tensor:
        rows = torch.arange(len(partner), device=similarities.device)
        logits = similarities / self.temperature
        logits = logits.masked_fill(not_negative, float("-inf"))
        return torch.logsumexp(logits, dim=1) - logits[rows, partner]


class TripletWithMemory(PairLossWithMemory):
    """Triplet loss with semi-hard negatives from the batch and the cross-batch memory (paper Table 2).

    For an anchor with positive similarity ``s_pos``, the negative is the most similar one with
    ``s_neg < s_pos`` (semi-hard), or, when no negative is less similar than the positive, the least similar
    negative; the anchor's loss is ``max(0, s_neg - s_pos + margin)``. An anchor without any negative adds 0.

    Args:
        margin: The triplet margin on cosine similarity (paper: 0.01).
        memory_size, symmetric, mask_same_cell: as `InfoNCEWithMemory`.
    """

    def __init__(
        self,
        margin: float = 0.01,
        memory_size: int = 4096,
        *,
        symmetric: bool = True,
        mask_same_cell: bool = True,
    ) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        super().__init__(memory_size, symmetric=symmetric, mask_same_cell=mask_same_cell)
        self.margin = float(margin)

    def pair_loss(
        self, similarities: torch.Tensor, not_negative: torch.Tensor, partner: torch.Tensor
    ) -> torch.Tensor:
        rows = torch.arange(len(partner), device=similarities.device)
        positive = similarities[rows, partner]
        negative = ~not_negative
        negative[rows, partner] = False
        semi_hard = negative & (similarities < positive[:, None])
        hardest_semi_hard = similarities.masked_fill(~semi_hard, float("-inf")).amax(dim=1)
        easiest = similarities.masked_fill(~negative, float("inf")).amin(dim=1)
        chosen = torch.where(semi_hard.any(dim=1), hardest_semi_hard, easiest)
        has_negative = negative.any(dim=1)
        # Anchors without negatives compare their positive with itself: loss max(0, margin) * 0.
        chosen = torch.where(has_negative, chosen, positive)
        return torch.relu(chosen - positive + self.margin) * has_negative


def create_retrieval_loss(
    kind: str = "infonce",
    *,
    temperature: float = 0.05,
    margin: float = 0.01,
    memory_size: int = 4096,
    symmetric: bool = True,
    mask_same_cell: bool = True,
) -> PairLossWithMemory:
    """The loss named by ``retrieval.loss``: ``infonce`` (the paper) or ``triplet`` (its Table 2 ablation).

    Raises:
        ValueError: for ``none`` (nothing to train: the backbone features are the embeddings) or an unknown
            kind (the choices named).
    """
    if kind == "infonce":
        return InfoNCEWithMemory(temperature, memory_size, symmetric=symmetric, mask_same_cell=mask_same_cell)
    if kind == "triplet":
        return TripletWithMemory(margin, memory_size, symmetric=symmetric, mask_same_cell=mask_same_cell)
    if kind == "none":
        raise ValueError(
            "retrieval.loss=none trains no retrieval module (the backbone features are the embeddings)"
        )
    raise choice_error("retrieval loss", kind, RETRIEVAL_LOSSES)
