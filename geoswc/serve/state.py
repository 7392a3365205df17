"""What every route of ``geoswc serve`` shares, kept on ``app.state.serve``: the loaded model, the settings,
the batcher, the memory budget, the tag run and the thumbnail cache."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fastapi import Request

from geoswc.geolocator import MODES, Geolocator
from geoswc.serve.batching import DynamicBatcher
from geoswc.serve.budget import MemoryBudget
from geoswc.serve.inference import batch_runner
from geoswc.serve.settings import ServeSettings
from geoswc.street.predictor import STREET_MODES, StreetGeolocator
from geoswc.tagging.output import output_format, read_rows

__all__ = ["ServeState", "serve_state"]


@dataclass
class ServeState:
    """The shared state of one app (`create_app` builds it, the routers read it)."""

    model: Geolocator
    settings: ServeSettings
    batcher: DynamicBatcher
    budget: MemoryBudget
    tags_rows: Optional[List[dict]] = None
    thumbnails: "OrderedDict[str, bytes]" = field(default_factory=OrderedDict)
    _background_ids: Optional[Dict[str, int]] = None

    @classmethod
    def build(cls, model: Geolocator, settings: ServeSettings) -> "ServeState":
        batcher: DynamicBatcher = DynamicBatcher(
            batch_runner(model, settings.max_batch),
            max_batch=settings.max_batch,
            max_wait_ms=settings.batch_wait_ms,
        )
        tags_rows = None
        if settings.tags is not None:
            tags_rows = read_rows(settings.tags, output_format(settings.tags))
        budget = MemoryBudget(settings.max_decode_bytes)
        return cls(model=model, settings=settings, batcher=batcher, budget=budget, tags_rows=tags_rows)

    def modes_available(self) -> List[str]:
        if isinstance(self.model, StreetGeolocator):
            return list(STREET_MODES)
        searchable = self.model.index is not None and self.model.retrieval is not None
        return [m for m in MODES if m == "cell" or searchable]

    def background_ids(self) -> Optional[Dict[str, int]]:
        """The background index's ids (their row numbers), None without an index; built on first use."""
        if isinstance(self.model, StreetGeolocator):  # database photos are named by their paths
            if self._background_ids is None:
                self._background_ids = self.model.database_ids()
            return self._background_ids
        index = self.model.index
        if index is None or index.ids is None:
            return None
        if self._background_ids is None:
            self._background_ids = {str(v): i for i, v in enumerate(index.ids)}
        return self._background_ids


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve
