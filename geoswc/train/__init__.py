"""The training stages of the ICMR 2021 system as functions (sections 3 and 4.2).

Each stage takes the resolved `Config`, the `Geocells` and plain values (paths, `Photos`), writes its folder and
returns a `StageResult` (its folder, the files a later stage reads, a summary):

    train_backbone    EfficientNet + CE over the finest cells, end to end on images
    extract_features  pooled backbone features of a photo set -> feature cache (resumable, multi-process)
    train_heads       CE / HC / MvMF heads on the frozen backbone, from cached features by default
    train_retrieval   the residual retrieval module (InfoNCE + cross-batch memory) on cached features
    build_index       the placeable background index

Every stage runs on one process or, under ``accelerate launch``, on N: each rank reads its own rows,
gradients are averaged by DDP, metrics are gathered, and the run records whether all ranks ended with
identical weights. ``geoswc train STAGE ...`` and ``accelerate launch -m geoswc train STAGE ...`` are the
command line over these functions (`geoswc.commands.train`); ``geoswc fit`` (`geoswc.train.fit`) composes them.
"""

from geoswc.train.classifier import train_backbone, train_heads
from geoswc.train.common import StageResult
from geoswc.train.features import extract_features
from geoswc.train.index import build_index
from geoswc.train.retrieval import train_retrieval
from geoswc.train.sources import Photos

__all__ = [
    "Photos",
    "StageResult",
    "build_index",
    "extract_features",
    "train_backbone",
    "train_heads",
    "train_retrieval",
]
