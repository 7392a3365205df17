"""Residual retrieval module, InfoNCE with cross-batch memory, and the background index (paper 3.3)."""

from importlib import import_module

_EXPORTS = {
    "ResidualRetrievalModule": "model",
    "IdentityEmbedding": "model",
    "load_retrieval": "model",
    "InfoNCEWithMemory": "loss",
    "TripletWithMemory": "loss",
    "create_retrieval_loss": "loss",
    "gather_with_local_grad": "loss",
    "OnePairPerCellSampler": "sampler",
    "BackgroundIndex": "index",
    "recall_at_k": "index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so `geoswc --help` does not pay for importing torch.
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
