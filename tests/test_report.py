import re
import types

import numpy as np
import pytest
from PIL import Image

from geoswc.eval import read_peer_predictions, score_predictions
from geoswc.eval.report import cell_statistics, read_results_json, write_report, write_results_json


class _Partition:
    def __init__(self, name, centers_deg, counts):
        self.name, self.centers_deg, self.counts = name, np.asarray(centers_deg), np.asarray(counts)


@pytest.fixture(scope="module")
def evaluation(test_data):
    peers = {
        m: read_peer_predictions(test_data / "peer_predictions" / "im2gps" / f"{m}.csv")
        for m in ("base_M-fstar", "ISNs_M-fstar-S3")
    }
    truth = peers["base_M-fstar"].truth
    predictions = {
        "hc": peers["base_M-fstar"].predictions.iloc[:200],
        "hc+rrm": peers["ISNs_M-fstar-S3"].predictions,
    }
    results = {mode: score_predictions(pred, truth) for mode, pred in predictions.items()}
    return results, predictions, truth


@pytest.fixture(scope="module")
def geocells():
    rng = np.random.default_rng(1)
    return types.SimpleNamespace(
        partitions=[
            _Partition(
                "cells_50_5000",
                np.c_[rng.uniform(-60, 70, 40), rng.uniform(-180, 180, 40)],
                [51, 60, 70] + [100] * 36 + [4000],
            ),
            _Partition(
                "cells_50_1000",
                np.c_[rng.uniform(-60, 70, 5), rng.uniform(-180, 180, 5)],
                [50, 60, 90, 200, 1000],
            ),
        ]
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory, evaluation, geocells):
    results, predictions, truth = evaluation
    out = tmp_path_factory.mktemp("report")
    paths = write_report(
        out,
        results,
        predictions=predictions,
        truth=truth,
        geocells=geocells,
        commands=["geoswc evaluate --model m --benchmark im2gps -o out"],
        config={"swc": {"k": 10, "eps_km": 1.0}},
        title="im2gps check",
    )
    return out, paths


def test_files_exist_and_pngs_are_valid_images(report):
    out, paths = report
    assert {"markdown", "html", "curve", "map_predictions", "map_cells"} <= set(paths)
    for key in ("curve", "map_predictions", "map_cells"):
        assert paths[key].parent == out and paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(paths[key]) as img:
            img.verify()
        with Image.open(paths[key]) as img:
            assert img.width > 300 and img.height > 200


def test_html_is_self_contained(report):
    _, paths = report
    text = paths["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, flags=re.I)
    assert "<link" not in text and "<script" not in text
    assert text.count('src="data:image/png;base64,') == 3


def _table_rows(markdown):
    """Rows of the report's tables by first cell; the first table naming a key wins (the accuracy table comes
    before the sections that list the modes again)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    rows = {}
    for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines):
        rows.setdefault(cells[0], cells[1:])
    return rows


def test_table_numbers_match_the_results(report, evaluation):
    results, _, _ = evaluation
    _, paths = report
    markdown = paths["markdown"].read_text()
    rows = _table_rows(markdown)
    assert rows["mode"] == [
        "0.1 km",
        "1 km",
        "5 km",
        "10 km",
        "25 km",
        "200 km",
        "750 km",
        "2500 km",
        "median km",
        "mean km",
        "n evaluated",
        "missing",
    ]
    for mode, res in results.items():
        expected = [f"{res['accuracy'][k]:.1f}" for k in ("0.1", "1", "5", "10", "25", "200", "750", "2500")]
        expected += [
            f"{res['median_km']:.1f}",
            f"{res['mean_km']:.1f}",
            str(res["n_scored"]),
            str(res["n_missing"]),
        ]
        assert rows[mode] == expected
    # The published Im2GPS numbers of the ISNs model, and the 37 photos left out of "hc" counted as missing.
    assert rows["hc+rrm"][1] == "16.9" and rows["hc+rrm"][4] == "43.0"
    assert rows["hc"][-2:] == ["200", "37"]
    html = paths["html"].read_text()
    for mode in results:
        assert all(f"<td class=num>{v}</td>" in html for v in rows[mode])


def test_protocol_cells_and_provenance_are_stated(report):
    _, paths = report
    for text in (paths["markdown"].read_text(), paths["html"].read_text().replace("&lt;", "<")):
        assert "R = 6371 km" in text and "<= r" in text and "wrong at every radius" in text
        assert "geoswc evaluate --model m --benchmark im2gps -o out" in text
        assert '"eps_km": 1.0' in text.replace("&quot;", '"')
    rows = _table_rows(paths["markdown"].read_text())
    assert rows["cells_50_5000"] == ["40", str(51 + 60 + 70 + 3600 + 4000), "51", "100", "4000"]
    assert rows["cells_50_1000"] == ["5", "1400", "50", "90", "1000"]


def test_report_from_scores_only(tmp_path, evaluation):
    results, _, _ = evaluation
    paths = write_report(tmp_path, results)
    assert set(paths) == {"markdown", "html", "curve"}
    assert "No commands or configuration were recorded." in paths["markdown"].read_text()


def test_report_rejects_bad_input(tmp_path, evaluation):
    results, predictions, truth = evaluation
    with pytest.raises(ValueError, match="results is empty"):
        write_report(tmp_path, {})
    with pytest.raises(ValueError, match="modes without results: \\['mvmf'\\]"):
        write_report(tmp_path, results, predictions={"mvmf": predictions["hc"]}, truth=truth)
    with pytest.raises(ValueError, match="mode 'ce' is not a score dict"):
        write_report(tmp_path, {"ce": {"accuracy": {}}})


def test_results_json_round_trip(tmp_path, evaluation):
    results, _, _ = evaluation
    path = write_results_json(tmp_path / "sub" / "results.json", results)
    assert read_results_json(path) == results
    assert list(read_results_json(path)) == list(results)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_results_json(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text('{"ce": {"n_truth": 3}}')
    with pytest.raises(ValueError, match="mode 'ce' is not a score dict"):
        read_results_json(tmp_path / "bad2.json")
    with pytest.raises(FileNotFoundError):
        read_results_json(tmp_path / "absent.json")


def test_cell_statistics(geocells):
    stats = cell_statistics(geocells)
    assert stats[1] == {
        "name": "cells_50_1000",
        "cells": 5,
        "photos": 1400,
        "min": 50,
        "median": 90.0,
        "max": 1000,
    }


def test_importing_eval_stays_light():
    import subprocess
    import sys

    code = "import sys, geoswc.eval, geoswc.eval.report; print('matplotlib' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


def test_interactive_map_is_an_extra_file_when_folium_is_installed(tmp_path, evaluation):
    pytest.importorskip("folium")
    results, predictions, truth = evaluation
    paths = write_report(tmp_path, results, predictions={"hc": predictions["hc"]}, truth=truth)
    text = paths["map_interactive"].read_text()
    assert paths["map_interactive"].name == "map_interactive.html" and "L.circleMarker" in text
    # The main report stays offline: it names the extra file but loads nothing from it.
    html = paths["html"].read_text()
    assert "map_interactive.html" in html and "<script" not in html
