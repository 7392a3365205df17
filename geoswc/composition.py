"""Whether the parts of a `Geolocator` fit together: every part built on the same partition, every head's
partition one the background index can search within, and the feature widths of backbone, heads, retrieval
module and index equal. `Geolocator.from_parts` runs all of them; the constructor the partition checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional


def check_fingerprints(model: Any) -> None:
    """Every head, the retrieval module and the index were built on the model's partition."""
    parts = [(f"head {kind!r}", getattr(head, "fingerprint", None)) for kind, head in model.heads.items()]
    parts.append(("retrieval module", getattr(model.retrieval, "fingerprint", None)))
    parts.append(("background index", getattr(model.index, "fingerprint", None)))
    for name, fingerprint in parts:
        if fingerprint is not None and str(fingerprint) != model.fingerprint:
            raise ValueError(
                f"{name} was built on partition {fingerprint!r} but the geocells have fingerprint "
                f"{model.fingerprint!r}; use the cells it was trained with"
            )


def check_index_partitions(model: Any) -> None:
    """Every head's partition is one the background index can search within, with as many cells."""
    if model.index is None or not hasattr(model.index, "partitions"):
        return
    own = model._index_partition()
    sizes = {(own if name is None else name): n for name, n in model.index.partitions.items()}
    for kind in model.heads:
        part = model.head_partition(kind)
        if part.name not in sizes:
            raise ValueError(
                f"head {kind!r} predicts the cells of partition {part.name!r}, but the background index has "
                f"rows per cell of {', '.join(sizes)} only; rebuild the index (geoswc index build adds "
                "every partition of the cells) or add it with BackgroundIndex.add_partition"
            )
        if sizes[part.name] != len(part):
            raise ValueError(
                f"the background index has {sizes[part.name]} cells for partition {part.name!r}, but the "
                f"cells have {len(part)}"
            )


def check_parts_fit(
    backbone: Any,
    *,
    heads: Optional[Mapping[str, Any]] = None,
    retrieval: Any = None,
    index: Any = None,
    sources: Optional[Mapping[str, Any]] = None,
    retrieval_width: Optional[int] = None,
) -> None:
    """The heads and the retrieval module take the backbone's feature width, and the index holds embeddings of
    the retrieval module's width; ``sources`` names where the parts came from (see `Geolocator.from_parts`).
    ``retrieval_width``: the width the retrieval module takes when it is not the backbone's (a retrieval
    pool's descriptors)."""
    sources = dict(sources or {})
    where = {
        "backbone": sources.get("backbone", "the backbone"),
        "heads": dict(sources.get("heads") or {}),
        "retrieval": sources.get("retrieval", "the retrieval module"),
        "index": sources.get("index"),
    }
    width = getattr(backbone, "num_features", None)
    for kind, head in (heads or {}).items():
        taken = getattr(head, "in_features", None)
        if width is not None and taken is not None and taken != width:
            raise ValueError(
                f"{where['heads'].get(kind, f'head {kind!r}')}: the head takes {taken} features, but the "
                f"backbone ({where['backbone']}) gives {width}"
            )
    dim = getattr(retrieval, "dim", None)
    given = width if retrieval_width is None else retrieval_width
    if given is not None and dim is not None and dim != given:
        source = f"the backbone ({where['backbone']})" if retrieval_width is None else "the retrieval pool"
        raise ValueError(
            f"{where['retrieval']}: the retrieval module takes features of dim {dim}, but {source} gives {given}"
        )
    index_dim = getattr(index, "dim", None)
    if dim is not None and index_dim is not None and index_dim != dim:
        embeddings = (
            "the background index" if where["index"] is None else Path(where["index"]) / "embeddings.npy"
        )
        raise ValueError(
            f"{embeddings}: embeddings of dim {index_dim}, but the retrieval module ({where['retrieval']}) "
            f"gives dim {dim}"
        )
