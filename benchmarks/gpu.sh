#!/usr/bin/env bash
# Every GPU measurement of geoswc in one run (< 8 minutes on one H100/H200-class GPU), printed as one JSON:
# B4 training and inference images/s at 300 px (bf16/fp16, channels_last, torch.compile), end-to-end
# `geoswc tag` images/s from JPEG files with the decoding workers, Search within Cell and exact global search
# queries/s on a 4.7M x 1792 float16 background (FAISS-GPU too when installed). See benchmarks/gpu_bench.py.
#
#   benchmarks/gpu.sh                     # on a GPU machine, with geoswc installed
#   benchmarks/gpu.sh --out gpu.json      # also write the JSON to a file
#   benchmarks/gpu.sh --smoke             # dry run on the CPU with tiny sizes (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python}" benchmarks/gpu_bench.py "$@"
