"""The losses that train place-recognition descriptors (L2-normalised rows).

- `triplet_margin_loss`: NetVLAD's triplet ranking loss with the benchmark's settings (Berton et al., CVPR
  2022, ``train.py``): ``max(0, d(q, p) - d(q, n) + margin)`` with Euclidean ``d`` and margin 0.1, summed over
  every query and each of its negatives, divided by ``queries x negatives``.
- `batch_hard_soft_margin_loss`: the batch-hard triplet loss of McAleese (``000_…`` section 3.1, after Hermans
  et al. 2017): for every anchor of a P x K batch, its farthest positive and its nearest negative inside the
  batch, cosine distance ``1 - cos``, and the soft margin ``softplus(d_ap - d_an)`` in place of the hinge;
  averaged over the anchors that have both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRIPLET_MARGIN = 0.1


def triplet_margin_loss(
    queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *, margin: float = TRIPLET_MARGIN
) -> torch.Tensor:
    """``queries`` and ``positives`` ``(B, D)``, ``negatives`` ``(B, n, D)``: the mean triplet margin loss
    over the ``B x n`` triplets (torch's Euclidean ``pairwise_distance``, as ``nn.TripletMarginLoss``)."""
    b, n = negatives.shape[:2]
    total = queries.new_zeros(())
    for j in range(n):
        total = total + F.triplet_margin_loss(
            queries, positives, negatives[:, j], margin=float(margin), p=2, reduction="sum"
        )
    return total / (b * n)


def batch_hard_soft_margin_loss(
    embeddings: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, *, margin: float = 0.0
) -> torch.Tensor:
    """Batch-hard soft-margin loss of L2-normalised ``embeddings`` ``(N, D)`` with boolean ``(N, N)`` masks of
    positive and negative pairs: mean over anchors with both of ``softplus(margin + max_p d_ap - min_n d_an)``,
    ``d = 1 - cos``. Zero (with a gradient path) when no anchor has both."""
    dist = 1.0 - embeddings @ embeddings.T
    positive = positive.to(dist.device, torch.bool)
    negative = negative.to(dist.device, torch.bool)
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not bool(valid.any()):
        return embeddings.sum() * 0.0
    hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    return F.softplus(margin + hardest_pos[valid] - hardest_neg[valid]).mean()
