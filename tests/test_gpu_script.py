"""`benchmarks/gpu.sh --smoke`: every GPU measurement's code path runs on the CPU with tiny sizes and prints one
JSON object with every section measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_smoke_prints_one_json(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result == json.loads((tmp_path / "gpu.json").read_text())
    assert result["smoke"] is True and result["device"] == "cpu"
    for section in ("train", "inference", "tag", "search"):
        assert "error" not in result[section], result[section]
    assert result["train"]["images_per_s"] > 0
    assert result["inference"]["fp16"]["images_per_s"] > 0
    assert result["tag"]["photos"] == 12 and result["tag"]["images_per_s"] > 0
    assert result["search"]["swc"]["queries"] == 256 and result["search"]["swc"]["found"] == 1.0
    assert result["search"]["global_torch_flat"]["queries_per_s"] > 0
    assert result["search"]["background"] == {"rows": 20000, "dim": 64, "cells": 50}
