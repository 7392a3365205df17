"""Evaluating a model folder: `evaluate_model` (``geoswc evaluate``: the paper's Table 1 and its report), the
store of what an evaluation kept (features, head outputs, embeddings), and sweeps that replay Search within Cell
from that store without the backbone (``geoswc sweep``).

    run    evaluate_model: a benchmark's photos -> predictions per mode, results.json, report
    sweep  EvalStore, Replayer and the grids of ``geoswc sweep``
"""
