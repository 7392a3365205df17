"""`geoswc vpr evaluate` and `geoswc data synth --street` end to end, scored again by an independent scorer,
and the one-line errors of bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from vpr_fixtures import fails_in_one_line, make_tiny_world

from geoswc.cli import main
from geoswc.data.images import decode_array


def _utm(name: str) -> np.ndarray:
    """Easting and northing straight from a file name (fields 1 and 2 between '@')."""
    fields = Path(name).name.split("@")
    return np.array([float(fields[1]), float(fields[2])])


def independent_scores(world: Path, predictions_csv: Path, ns=(1, 5, 10, 20), radius_m: float = 25.0):
    """recall@N and the median first-result distance from predictions.csv and the file names alone."""
    split = world / "images" / "test"
    database = sorted(p.name for p in (split / "database").iterdir())
    db_utm = np.stack([_utm(n) for n in database])
    ranked: dict = {}
    with predictions_csv.open() as handle:
        for row in csv.DictReader(handle):
            ranked.setdefault(row["query"], []).append((int(row["rank"]), row["database"]))
    queries = sorted(p.name for p in (split / "queries").iterdir())
    assert sorted(Path(q).name for q in ranked) == queries
    hits = {n: 0 for n in ns}
    first = []
    for query, rows in ranked.items():
        q = _utm(query)
        has_positive = np.sqrt(((db_utm - q) ** 2).sum(1)) <= radius_m
        ordered = [db for _, db in sorted(rows)]
        dist = [float(np.sqrt(((_utm(db) - q) ** 2).sum())) for db in ordered]
        first.append(dist[0])
        good = [d <= radius_m for d in dist]
        for n in ns:
            hits[n] += any(good[:n]) and bool(has_positive.any())
    return {n: 100.0 * hits[n] / len(queries) for n in ns}, float(np.median(first))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("streets") / "w")


@pytest.mark.slow
def test_evaluate_gem_writes_results_that_an_independent_scorer_reproduces(world, tmp_path):
    out = tmp_path / "eval"
    code = main(
        ["vpr", "evaluate", str(world), "--preset", "tiny", "--pool", "gem", "-o", str(out), "--quiet"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("predictions.csv", "report.md", "report.html", "recall_curve.png", "examples.png"):
        assert (out / name).is_file(), name
    assert results["split"] == "test"
    assert results["n_database"] == len(list((world / "images/test/database").iterdir()))
    assert results["n_queries"] == len(list((world / "images/test/queries").iterdir()))
    assert len(results["median_best_of_k_m"]) == 30
    best = list(results["median_best_of_k_m"].values())
    assert best == sorted(best, reverse=True)  # best-of-k never grows with k
    recalls, median_first = independent_scores(world, out / "predictions.csv")
    for n, value in recalls.items():
        assert results[f"recall@{n}"] == pytest.approx(value, abs=1e-9)
    assert results["median_top1_m"] == pytest.approx(median_first, abs=0.01)
    assert [c["mode"] for c in results["compact_index"]] == ["flat", "sq8", "pq", "bits"]
    assert results["compact_index"][3]["bytes_per_photo"] == 1280 / 8
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 20 * results["n_queries"]
    assert rows[0]["query"].startswith("queries/") and rows[0]["database"].startswith("database/")
    assert "Place recognition" in (out / "report.html").read_text()


@pytest.mark.slow
def test_evaluate_netvlad_pca_voting_bits(world, tmp_path):
    out = tmp_path / "eval"
    args = ["vpr", "evaluate", str(world), "--preset", "tiny", "--pool", "netvlad", "--clusters", "8"]
    args += ["--pca-dim", "32", "--test-method", "maj_voting", "--index-mode", "bits", "--recall", "1", "3"]
    args += ["--top", "5", "-o", str(out), "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["descriptor_dim"] == 32
    assert set(k for k in results if k.startswith("recall@")) == {"recall@1", "recall@3"}
    assert results["settings"]["pool"] == "netvlad" and results["settings"]["pca_dim"] == 32
    assert results["settings"]["index_mode"] == "bits"
    recalls, _ = independent_scores(world, out / "predictions.csv", ns=(1, 3))
    assert results["recall@1"] == pytest.approx(recalls[1]) and results["recall@3"] == pytest.approx(
        recalls[3]
    )


def test_data_synth_street(tmp_path):
    out = tmp_path / "streets"
    args = ["data", "synth", "--street", str(out), "--length", "60", "--step", "10", "--queries", "2"]
    assert main(args + ["--train-streets", "1", "--val-streets", "0", "--test-streets", "1"]) == 0
    names = sorted(p.name for p in (out / "images/test/database").iterdir())
    assert len(names) == 5  # 10 m to 50 m every 10 m
    east = [float(n.split("@")[1]) for n in names]
    assert np.allclose(np.diff(east), 10.0, atol=0.02)
    assert len(list((out / "images/test/queries").iterdir())) == 2
    assert main(args) == 2  # the folder exists now: refused, not overwritten
    assert json.loads((out / "world.json").read_text())["styles"] == 6


def test_street_world_styles_are_the_buildings_palette(tmp_path):
    from geoswc.data.synth_street import make_street_world

    def wall_colours(styles):
        out = tmp_path / f"w{styles}"
        make_street_world(out, streets={"test": 4}, queries_per_street=0, styles=styles, seed=3)
        rows = [decode_array(p)[60, 5:-5:4] for p in sorted((out / "images/test/database").iterdir())]
        return {tuple(int(v) // 16 for v in px) for px in np.concatenate(rows)}

    # One style: every building has the same wall, so the photos hold few colours; twelve: many more.
    assert len(wall_colours(1)) * 3 < len(wall_colours(12))
    with pytest.raises(ValueError, match="facade style"):
        make_street_world(tmp_path / "none", styles=0)


def test_a_corrupt_photo_is_refused_in_one_line_naming_it(world, tmp_path, capsys):
    import shutil

    from geoswc.data.images import ImageDecodeError
    from geoswc.vpr.pixels import pixel_recalls

    copy = tmp_path / "w"
    shutil.copytree(world, copy)
    shutil.copytree(copy / "images/test", copy / "images/val")  # vpr train selects its epoch on val
    for split, part in (("test", "database"), ("train", "database")):
        first = sorted((copy / "images" / split / part).iterdir())[0]
        first.write_bytes(first.read_bytes()[:300])  # a JPEG cut short
    corrupt = sorted((copy / "images/test/database").iterdir())[0]
    with pytest.raises(ImageDecodeError, match=re.escape(str(corrupt))):
        pixel_recalls(copy, "test")
    out = tmp_path / "out"
    args = ["vpr", "evaluate", str(copy), "--preset", "tiny", "-o", str(out), "--quiet"]
    fails_in_one_line(capsys, args, corrupt.name, "unreadable image")
    assert not out.exists()
    trained = tmp_path / "model"
    train_corrupt = sorted((copy / "images/train/database").iterdir())[0]
    fails_in_one_line(
        capsys, ["vpr", "train", str(copy), "-o", str(trained), "--preset", "tiny"], train_corrupt.name
    )


def test_bad_inputs_end_in_one_line_and_write_nothing(world, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--preset", "tiny", "-o", str(out), "--quiet"]
    fails_in_one_line(
        capsys, ["vpr", "evaluate", str(tmp_path), *base], "does not have the place-recognition layout"
    )

    bad = tmp_path / "bad"
    for part in ("database", "queries"):
        (bad / "images/test" / part).mkdir(parents=True)
    good = sorted((world / "images/test/database").iterdir())[0]
    (bad / "images/test/queries" / good.name).write_bytes(good.read_bytes())
    fails_in_one_line(capsys, ["vpr", "evaluate", str(bad), *base], "holds no photos", "database")

    (bad / "images/test/database" / "@12x@4.0@32@T@@@.jpg").write_bytes(good.read_bytes())
    fails_in_one_line(
        capsys, ["vpr", "evaluate", str(bad), *base], "malformed place-recognition file name", "@12x@4.0@"
    )

    (bad / "images/test/database" / "@12x@4.0@32@T@@@.jpg").unlink()
    far = good.name.replace("@" + good.name.split("@")[1] + "@", "@1.00@", 1)
    (bad / "images/test/database" / far).write_bytes(good.read_bytes())
    fails_in_one_line(capsys, ["vpr", "evaluate", str(bad), *base], "no query", "within 25 m")

    fails_in_one_line(
        capsys,
        ["vpr", "evaluate", str(world), "--preset", "tiny", "--model", str(world), "-o", str(out)],
        "exactly one",
    )
    fails_in_one_line(capsys, ["vpr", "evaluate", str(world), *base, "--recall", "0"], "--recall")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written result left


@pytest.mark.slow
def test_backbone_with_local_weights_equals_the_tiny_preset(world, tmp_path):
    from geoswc.classifiers.backbone import lite0_weights_path

    runs = {}
    for name, source in (
        ("preset", ["--preset", "tiny"]),
        ("backbone", ["--backbone", "tf_efficientnet_lite0", "--weights", str(lite0_weights_path())]),
    ):
        out = tmp_path / name
        assert main(["vpr", "evaluate", str(world), *source, "--pool", "gem", "-o", str(out), "--quiet"]) == 0
        runs[name] = (json.loads((out / "results.json").read_text()), (out / "predictions.csv").read_text())
    (preset, preset_csv), (backbone, backbone_csv) = runs["preset"], runs["backbone"]
    for key in ("recall@1", "recall@5", "recall@10", "recall@20", "median_top1_m"):
        assert backbone[key] == preset[key], key
    assert backbone_csv == preset_csv
    assert backbone["settings"]["backbone"] == preset["settings"]["backbone"] == "tf_efficientnet_lite0"
    assert backbone["settings"]["source"] == f"weights file {lite0_weights_path()}"


def test_backbone_without_weights_offline_fails_in_one_line(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "out"
    args = ["vpr", "evaluate", str(world), "--backbone", "resnet18", "--pool", "gem", "-o", str(out)]
    fails_in_one_line(capsys, args, "--backbone resnet18", "pass a local weights file with --weights FILE")
    fails_in_one_line(
        capsys, [*args[:3], "--preset", "tiny", "--weights", "x.pth", *args[5:]], "--weights FILE goes with"
    )
    assert not out.exists()


@pytest.mark.slow
def test_compact_128_bit_codes_of_netvlad_pca(tmp_path):
    """``--pca-dim 128``: the bits row is the 128-bit (16-byte) code of paper 000, flat 512 bytes, and the
    Hamming search keeps most of the float recall, well above a random ranking's."""
    from geoswc.data.synth_street import make_street_world
    from vpr_fixtures import TINY_STREETS

    world = tmp_path / "w"
    make_street_world(world, seed=1, **{**TINY_STREETS, "streets": {"train": 5, "val": 0, "test": 3}})
    out = tmp_path / "eval"
    args = ["vpr", "evaluate", str(world), "--preset", "tiny", "--pool", "netvlad", "--clusters", "8"]
    assert main([*args, "--pca-dim", "128", "-o", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["descriptor_dim"] == 128
    rows = {row["mode"]: row for row in results["compact_index"]}
    assert rows["bits"]["bytes_per_photo"] == 16 and rows["flat"]["bytes_per_photo"] == 512
    assert rows["flat"]["recall@1"] == results["recall@1"]
    # A random ranking finds a positive first with probability (positives / database photos) per query.
    split = world / "images" / "test"
    db = np.stack([_utm(p.name) for p in (split / "database").iterdir()])
    chance = 100.0 * np.mean(
        [(np.sqrt(((db - _utm(q.name)) ** 2).sum(1)) <= 25.0).mean() for q in (split / "queries").iterdir()]
    )
    assert rows["bits"]["recall@1"] <= rows["flat"]["recall@1"] + 100.0 / results["n_queries"] + 1e-9
    assert rows["bits"]["recall@1"] >= 1.5 * chance, (rows, chance)
