"""A bounded burst on a real `geoswc serve` (benchmarks/bench_serve.py, 127.0.0.1 only): every request answered
with an ok row, none lost, and concurrent requests share forward passes under dynamic batching."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"


@pytest.mark.slow
def test_a_burst_of_concurrent_uploads_is_answered_whole(tiny_model_dir, tmp_path):
    out = tmp_path / "load.json"
    args = ["--model", str(tiny_model_dir), "--requests", "96", "--concurrency", "16", "--json", str(out)]
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["results"]
    for name in ("dynamic batching", "one at a time"):
        assert results[name]["errors"] == 0, name
        assert results[name]["answered"] == 96, name
    assert results["one at a time"]["mean_batch"] == 1.0
    assert results["dynamic batching"]["mean_batch"] > 1.0
