"""A backbone with one head on top: the end-to-end classifier trained in stage 1 (paper 4.2)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from geoswc.classifiers.base import GeoHead


class CellClassifier(nn.Module):
    """``images -> head(backbone(images))``; ``freeze_backbone`` trains only the head (backbone in eval mode,
    no gradients), the paper's setting for HC and MvMF on images."""

    def __init__(self, backbone: nn.Module, head: GeoHead, *, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "CellClassifier":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.freeze_backbone:
            with torch.no_grad():
                features = self.backbone(images)
        else:
            features = self.backbone(images)
        return self.head(features)
