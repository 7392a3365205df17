"""The CPU engines that can run the backbone, and the per-machine measurement that chooses among them.

- `geoswc.engines.openvino`: the backbone's exported graph compiled by OpenVINO (AMD and Intel CPUs);
- `geoswc.engines.graphs`: the exported graphs kept on disk by model fingerprint and input size, and the cache
  folder they live in (``GEOSWC_CACHE``, else ``$XDG_CACHE_HOME/geoswc``, else ``~/.cache/geoswc``);
- `geoswc.engines.choice`: ``--runtime auto`` on a CPU: each available engine timed on the model's own input,
  checked against PyTorch, the fastest that agrees chosen and remembered per machine and model.

ONNX Runtime's forward itself is `geoswc.runtime.OnnxForward`, which the OpenVINO forward extends.
"""
