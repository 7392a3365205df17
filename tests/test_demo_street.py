"""`geoswc demo --street` on a small street world: the files it writes, a table whose every row is recomputed
from what the steps wrote (raw pixels by the scorer of `geoswc.vpr.pixels`, models from their results.json),
a street model that locates the test queries, and a rerun that reuses every step."""

from __future__ import annotations

import json

import pytest
import torch

from geoswc.demo_street import POOLS, run_street_demo
from geoswc.vpr.pixels import pixel_recalls

SMALL = {"train": 2, "val": 1, "test": 1}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a loaded 2-core machine wait on each other
    try:
        out = tmp_path_factory.mktemp("street") / "demo"
        lines = []
        summary = run_street_demo(
            out, streets=SMALL, queries_per_street=6, epochs=1, overrides=["places=4"], echo=lines.append
        )
        return out, summary, lines
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_street_demo_writes_its_table_from_its_steps(demo):
    out, summary, lines = demo
    rows = summary["rows"]
    assert len(rows) == 1 + 2 * len(POOLS)
    pixels = pixel_recalls(out / "world", "test")
    assert rows[0]["recall@1"] == pixels["recall@1"] and rows[0]["recall@5"] == pixels["recall@5"]
    for row, folder in zip(rows[1:], [f"off-the-shelf-{p}" for p in POOLS] + list(POOLS)):
        results = json.loads((out / "eval" / folder / "results.json").read_text())
        assert row["recall@1"] == results["recall@1"] and row["median_top1_m"] == results["median_top1_m"]
    for pool in POOLS:
        assert (out / "models" / pool / "vpr.json").is_file()
        spec = json.loads((out / "models" / pool / "vpr.json").read_text())
        assert spec["pool"] == pool and spec["trained_aggregation"] is True
    table = (out / "street_results.md").read_text()
    assert f"| {rows[0]['name']} | {rows[0]['recall@1']:.1f} |" in table
    assert any(line.startswith("serve:    geoswc serve --model") for line in lines)
    # The street model answers for the test queries through the front door's loader.
    from geoswc.geolocator import Geolocator

    model = Geolocator.from_pretrained(out / "street-model")
    assert type(model).__name__ == "StreetGeolocator"


@pytest.mark.slow
def test_street_demo_rerun_reuses_every_step(demo):
    out, summary, _ = demo
    before = {p: (out / "models" / p / "aggregation.safetensors").stat().st_mtime_ns for p in POOLS}
    lines = []
    again = run_street_demo(
        out, streets=SMALL, queries_per_street=6, epochs=1, overrides=["places=4"], echo=lines.append
    )
    assert again["rows"] == summary["rows"]
    # off the shelf, training and evaluation of each pool, and the index
    assert sum("already done, reused" in line for line in lines) == 3 * len(POOLS) + 1
    assert any("already there, reused" in line for line in lines)
    after = {p: (out / "models" / p / "aggregation.safetensors").stat().st_mtime_ns for p in POOLS}
    assert after == before


def test_street_demo_refuses_a_folder_of_the_users(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        run_street_demo(tmp_path, streets=SMALL, echo=lambda _: None)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_street_demo_leaves_the_global_demos_world_alone(tmp_path):
    from geoswc.demo_folder import claim_demo_folder

    out = tmp_path / "demo"
    claim_demo_folder(out)  # a folder the global demo marked and filled
    (out / "world").mkdir()
    (out / "world" / "train.csv").write_text("IMG_ID,LAT,LON\n")
    with pytest.raises(ValueError, match="did not record"):
        run_street_demo(out, streets=SMALL, echo=lambda _: None)
    assert (out / "world" / "train.csv").read_text() == "IMG_ID,LAT,LON\n"
