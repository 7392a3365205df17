"""`geoswc demo` on a small synthetic world: every artefact is written and the paper's effect shows."""

import json
from pathlib import Path

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


def test_a_folder_the_demo_did_not_write_is_refused_before_anything_is_written(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_bytes(b"four years of work")
    assert main(["demo", "-o", str(mine), "--cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(mine) in err and "thesis.docx" in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.docx"]


def test_photos_the_demo_did_not_copy_are_never_deleted(tmp_path, capsys):
    from geoswc.demo_folder import DEMO_MARKER, claim_demo_folder

    out = tmp_path / "demo"
    assert claim_demo_folder(out) == [] and (out / DEMO_MARKER).is_file()
    family = out / "photos" / "family"
    family.mkdir(parents=True)
    (family / "grandma.jpg").write_bytes(b"irreplaceable")
    assert main(["demo", "-o", str(out), "--cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(family) in err and "not written by geoswc demo" in err, err
    assert (family / "grandma.jpg").read_bytes() == b"irreplaceable"
    assert not (out / "world").exists()


def test_a_rerun_replaces_only_what_the_demo_wrote(tmp_path):
    from geoswc.data.synth import make_world
    from geoswc.demo_folder import check_photos_folder, claim_demo_folder, copy_photos, remove_world

    out = tmp_path / "demo"
    claim_demo_folder(out)
    world = out / "world"
    make_world(world, n_train=6, n_test=4, seed=0, progress=False, workers=1)
    ids = copy_photos(out, world, 3, [])
    names = sorted(Path(i).name for i in ids)
    assert sorted(p.name for p in (out / "photos").iterdir()) == names
    assert sorted(claim_demo_folder(out)) == names  # recorded in the marker

    # A file of the user's inside the world's images is kept when the world is written again.
    keep = world / "images" / "mine.txt"
    keep.write_text("mine")
    remove_world(world)
    assert sorted(p.relative_to(world).as_posix() for p in world.rglob("*")) == ["images", "images/mine.txt"]
    (world / "notes.txt").write_text("mine too")
    with pytest.raises(ValueError, match="notes.txt was not written by geoswc demo"):
        remove_world(world)

    # The demo's own photos are replaced; one more file in photos/ stops the rerun first.
    make_world(world, n_train=6, n_test=4, seed=1, progress=False, workers=1)
    again = copy_photos(out, world, 2, names)
    assert sorted(p.name for p in (out / "photos").iterdir()) == sorted(Path(i).name for i in again)
    (out / "photos" / "extra.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="extra.jpg was not written by geoswc demo"):
        check_photos_folder(out / "photos", claim_demo_folder(out))
