"""Photos of mixed shapes end to end, through a real model folder whose ``eval_resize`` is ``longest``.

A landscape, a portrait, a panorama and an EXIF-rotated photo come out of the paper's evaluation transform
with different shapes; with the default batch size they share a batch. `geoswc tag` once aborted on the first
batch mixing orientations. Here tagging (API and CLI), evaluation and `Geolocator.predict` must give every
photo a result, and a photo's prediction must not depend on the photos it was batched with.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from photo_fixtures import make_mixed_photos

TABLE_MODES = ("ce", "hc", "mvmf", "rrm", "ce+rrm", "hc+rrm", "mvmf+rrm")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_mixed_photos(tmp_path_factory.mktemp("mixed") / "photos")


@pytest.fixture(scope="module")
def folder(photos):
    return next(iter(photos.values())).path.parent


def test_model_folder_resizes_the_longest_side(tiny_model_dir):
    # Otherwise every photo would come out square and nothing here would mix shapes.
    config = yaml.safe_load((Path(tiny_model_dir) / "config.yaml").read_text())
    assert config["data"]["eval_resize"] == "longest"


def check_rows(rows, photos):
    """One ``ok`` row per photo, nothing missing, nothing twice."""
    names = [os.path.basename(str(row["path"])) for row in rows]
    assert sorted(names) == sorted(photos), "a photo is missing or has two rows"
    by_name = dict(zip(names, rows))
    for name, row in by_name.items():
        assert row["status"] == "ok", f"{name}: {row.get('error')}"
        assert -90 <= row["lat"] <= 90 and -180 <= row["lon"] <= 180
    return by_name


def test_tag_photos_gives_every_mixed_photo_an_ok_row(tiny_model_dir, photos, folder, tmp_path):
    from geoswc import tag_photos
    from geoswc.tagging.output import read_rows

    out = tmp_path / "tags.csv"
    summary = tag_photos([str(folder)], model=str(tiny_model_dir), out=str(out))
    assert isinstance(summary, dict)
    assert summary["ok"] == len(photos) and summary["error"] == 0
    check_rows(read_rows(str(out), "csv"), photos)


def test_cli_tag_gives_the_same_rows(tiny_model_dir, photos, folder, tmp_path, capsys):
    from geoswc.cli import main
    from geoswc.tagging.output import read_rows

    out = tmp_path / "cli.csv"
    assert main(["tag", str(folder), "--model", str(tiny_model_dir), "-o", str(out), "--workers", "0"]) == 0
    cli_rows = check_rows(read_rows(str(out), "csv"), photos)

    from geoswc import tag_photos

    api_out = tmp_path / "api.csv"
    tag_photos([str(folder)], model=str(tiny_model_dir), out=str(api_out))
    api_rows = check_rows(read_rows(str(api_out), "csv"), photos)
    for name in photos:
        cli, api = cli_rows[name], api_rows[name]
        assert cli["path"] == api["path"] and cli["status"] == api["status"]
        assert cli["lat"] == pytest.approx(api["lat"], abs=1e-5), name
        assert cli["lon"] == pytest.approx(api["lon"], abs=1e-5), name
        assert cli["cell_token"] == api["cell_token"] and cli["method"] == api["method"]


def test_evaluate_model_scores_every_mixed_photo(tiny_model_dir, photos, folder, tmp_path):
    from geoswc import evaluate_model

    meta = tmp_path / "meta.csv"
    lines = ["IMG_ID,LAT,LON"]
    for k, name in enumerate(sorted(photos)):
        lines.append(f"{name},{-60 + 13.5 * k:.4f},{-170 + 37.25 * k:.4f}")
    meta.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"

    results = evaluate_model(str(tiny_model_dir), str(meta), images=str(folder), out=str(out))
    # The tiny model has every part, so every mode of Table 1 runs.
    assert set(results) == set(TABLE_MODES)
    for mode, scores in results.items():
        # Key names of geoswc.eval.metrics.score_predictions.
        assert scores["n_truth"] == len(photos), mode
        assert scores["n_scored"] == len(photos), mode
        assert scores["n_missing"] == 0, mode
        assert set(scores["accuracy"]) >= {"1", "25", "2500"}, mode
    written = json.loads((out / "results.json").read_text())
    assert {mode: written[mode]["n_missing"] for mode in written} == {mode: 0 for mode in TABLE_MODES}


def test_predict_does_not_depend_on_the_batch(tiny_model_dir, photos):
    from geoswc.geolocator import Geolocator

    model = Geolocator.from_pretrained(tiny_model_dir)
    paths = [str(photos[name].path) for name in sorted(photos)]
    together = model.predict(paths)
    assert len(together) == len(paths)
    assert all(isinstance(record, dict) for record in together)
    backwards = model.predict(paths[::-1])[::-1]
    for path, mixed, reordered in zip(paths, together, backwards):
        (alone,) = model.predict([path])
        for other in (mixed, reordered):
            assert other["lat"] == pytest.approx(alone["lat"], abs=1e-5), path
            assert other["lon"] == pytest.approx(alone["lon"], abs=1e-5), path
