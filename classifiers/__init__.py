"""Backbone and classification heads that predict a photo's cell: CE, HC and MvMF (paper section 3.2)."""

from geoswc.classifiers.backbone import (
    create_backbone,
    lite0_weights_path,
    load_backbone,
    load_backbone_weights,
    save_backbone,
)
from geoswc.classifiers.base import GeoHead
from geoswc.classifiers.heads import (
    HEADS,
    CEHead,
    HCHead,
    create_head,
    default_partitions,
    load_head,
    save_head,
)
from geoswc.classifiers.mvmf import MvMFHead, vmf_log_density, vmf_log_normalizer
from geoswc.classifiers.model import CellClassifier

__all__ = [
    "create_backbone",
    "load_backbone",
    "load_backbone_weights",
    "lite0_weights_path",
    "save_backbone",
    "GeoHead",
    "HEADS",
    "CEHead",
    "HCHead",
    "MvMFHead",
    "CellClassifier",
    "create_head",
    "default_partitions",
    "load_head",
    "save_head",
    "vmf_log_density",
    "vmf_log_normalizer",
]
