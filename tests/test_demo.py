"""`geoswc demo` on a small synthetic world: every artefact is written and the paper's effect shows."""

import json

import pandas as pd
import pytest

from geoswc.cli import main
from geoswc.geolocator import Geolocator


@pytest.mark.slow
def test_demo_shows_search_within_cell_beating_the_heads_at_1_km(tmp_path, capsys):
    # The ImageNet backbone as it is (no fine-tuning epoch) keeps this test within the suite's time budget.
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "-o",
                str(out),
                "--train",
                "1200",
                "--test",
                "120",
                "--seed",
                "1",
                "--cpu",
                "--set",
                "backbone.epochs=0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out

    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results) == {"ce", "hc", "mvmf", "rrm", "ce+rrm", "hc+rrm", "mvmf+rrm"}
    best_head_1km = max(results[m]["accuracy"]["1"] for m in ("ce", "hc", "mvmf"))
    best_swc_1km = max(results[m]["accuracy"]["1"] for m in ("ce+rrm", "hc+rrm", "mvmf+rrm"))
    # Search within Cell pins landmark photos down; a cell centre cannot.
    assert best_swc_1km >= best_head_1km + 20, (best_swc_1km, best_head_1km)
    # Classification alone still gets the region right.
    for mode in ("ce", "hc", "mvmf"):
        assert results[mode]["accuracy"]["2500"] >= 70, (mode, results[mode]["accuracy"])
        assert results[mode]["accuracy"]["750"] >= 50, (mode, results[mode]["accuracy"])

    report = (out / "eval" / "report.md").read_text()
    assert "geoswc fit" in report and "geoswc data synth" in report and "geoswc evaluate" in report
    assert "map_cells.png" in report and (out / "eval" / "map_cells.png").is_file()
    assert (out / "eval" / "report.html").is_file()
    tags = pd.read_csv(out / "tags.csv")
    assert len(tags) == 24
    model = Geolocator.from_pretrained(out / "model", device="cpu")
    assert model.head_names and len(model.index) > 0
    assert "Search within Cell" in printed and str(out / "eval" / "report.html") in printed
    assert str(out / "model") in printed and str(out / "tags.csv") in printed

    # A second run reuses the world and every trained stage.
    assert (
        main(
            [
                "demo",
                "-o",
                str(out),
                "--train",
                "1200",
                "--test",
                "120",
                "--seed",
                "1",
                "--cpu",
                "--set",
                "backbone.epochs=0",
            ]
        )
        == 0
    )
    again = capsys.readouterr().out
    assert "already there, reused" in again
    assert again.count("up to date, skipped") == 8
