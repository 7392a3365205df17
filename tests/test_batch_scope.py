"""Batch sizes are per process (docs/training.md, "Batch sizes and processes"): N ranks train on
N x batch_size rows a step, and every saved config says so."""

import numpy as np
import yaml

from geoswc.config import YAML_HEADER, Config, load_preset
from geoswc.train.engine import rank_batches


def test_each_of_two_ranks_takes_a_full_batch_so_a_step_sees_twice_the_batch():
    n, batch = 64, 8
    ranks = [rank_batches(n, batch, epoch=0, seed=0, num_processes=2, process_index=r) for r in (0, 1)]
    # Hand count: 64 rows over 2 ranks = 32 each = 4 batches of 8 per rank; one step = 2 x 8 = 16 rows.
    assert [len(b) for b in ranks] == [4, 4]
    assert all(len(batch_rows) == batch for r in ranks for batch_rows in r)
    rows = np.concatenate([np.concatenate(r) for r in ranks])
    assert sorted(rows.tolist()) == list(range(n))  # disjoint, every row once
    alone = rank_batches(n, batch, epoch=0, seed=0)
    assert len(alone) == 8  # one process: twice the steps of the same size


def test_the_saved_config_says_batch_sizes_are_per_process(tmp_path):
    path = tmp_path / "config.yaml"
    load_preset("paper").save(path)
    text = path.read_text()
    assert text.startswith(YAML_HEADER) and "per process" in text and "64 / N" in text
    assert Config.load(path).backbone.batch_size == 64
    assert yaml.safe_load(text)["heads"]["batch_size"] == 64
