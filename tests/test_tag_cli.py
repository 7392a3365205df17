"""`geoswc tag` as archivists run it: killed with SIGKILL and resumed, and split over two real ranks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from geoswc.tagging.output import read_rows
from conftest import two_rank_launch

TESTS = Path(__file__).resolve().parent

RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from test_tag import MeanColour
from geoswc.tagging.run import summary_lines, tag_photos
resume = "--resume" in sys.argv
summary = tag_photos([{root!r}], model=MeanColour(), out=sys.argv[1], batch_size=2, workers=1, resume=resume)
for line in summary_lines(summary):
    print(line)
"""


def make_archive(root, n):
    root.mkdir(parents=True)
    for i in range(n):
        colour = (i * 255 // n, 255 - i * 255 // n, (i * 37) % 256)
        Image.new("RGB", (40, 30), colour).save(root / f"img{i:03d}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")


def runner(tmp_path, root):
    script = tmp_path / "run_tag.py"
    script.write_text(RUNNER.format(tests=str(TESTS), root=str(root)))
    return script


def count_rows(path):
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def rows_by_path(path, fmt):
    rows = read_rows(str(path), fmt)
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    return {row["path"]: row for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "geojson"])
def test_sigkill_mid_run_then_resume_gives_every_photo_once(tmp_path, fmt):
    root = tmp_path / "archive"
    make_archive(root, 40)
    script = runner(tmp_path, root)
    reference = tmp_path / f"reference.{fmt}"
    subprocess.run([sys.executable, str(script), str(reference)], check=True, timeout=120)

    out = tmp_path / f"tags.{fmt}"
    # What grows during the run: the CSV itself, or the JSONL journal behind a GeoJSON output.
    growing = out if fmt == "csv" else Path(f"{out}.journal-00000.jsonl")
    env = dict(os.environ, GEOSWC_TAG_BATCH_DELAY_S="0.1")
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while count_rows(growing) < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoding workers, without any chance to clean up
    proc.wait()
    killed_at = count_rows(growing)
    assert 12 <= killed_at < 40, "the kill should land mid-run"
    assert not out.exists() or fmt == "csv"

    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(script), str(out)], check=True, timeout=120, capture_output=True)
    done = subprocess.run(
        [sys.executable, str(script), str(out), "--resume"],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert "40 ok, 1 error rows" in done.stdout
    assert not growing.exists() or fmt == "csv"
    expected, got = rows_by_path(reference, fmt), rows_by_path(out, fmt)
    assert got.keys() == expected.keys()
    for path, row in expected.items():
        assert got[path] == row


TWO_RANKS = """
import sys
sys.path.insert(0, {tests!r})
from test_tag import MeanColour
from geoswc.tagging.run import Ranks, tag_photos
ranks = Ranks()
summary = tag_photos([{root!r}], model=MeanColour(), out=sys.argv[1], batch_size=3, workers=0, ranks=ranks)
print(f"rank {{ranks.rank}} of {{ranks.world}} tagged {{summary['tagged']}}", flush=True)
"""


@pytest.mark.slow
def test_two_ranks_split_the_photos_and_merge_one_output(tmp_path):
    root = tmp_path / "archive"
    make_archive(root, 13)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(TESTS), root=str(root)))
    reference = tmp_path / "reference.jsonl"
    subprocess.run([sys.executable, str(script), str(reference)], check=True, timeout=120)
    out = tmp_path / "tags.parquet"
    launch = [
        *two_rank_launch(),
        str(script),
        str(out),
    ]
    done = subprocess.run(launch, check=True, timeout=240, capture_output=True, text=True)
    assert "rank 0 of 2 tagged 7" in done.stdout and "rank 1 of 2 tagged 7" in done.stdout
    expected, got = rows_by_path(reference, "jsonl"), rows_by_path(out, "parquet")
    assert list(got) == list(expected)  # one row per photo, in discovery order
    for path, row in expected.items():
        for key, value in row.items():
            assert got[path][key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)
    assert not list(tmp_path.glob("tags.parquet.journal-*"))
    # Rank 0 wrote the run record and released its lock.
    assert (tmp_path / "tags.parquet.run.json").is_file() and not (tmp_path / "tags.parquet.lock").exists()


def test_cli_refuses_bad_outputs_before_loading_a_model(tmp_path, capsys):
    from geoswc.cli import main

    root = tmp_path / "archive"
    make_archive(root, 2)
    assert (
        main(["tag", str(root), "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "t.xlsx")]) == 2
    )
    assert (
        "unknown output format '.xlsx'; choose one of: .csv, .jsonl, .geojson, .parquet"
        in capsys.readouterr().err
    )
    assert main(["tag", str(root), "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "t.csv")]) == 2
    assert "model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tag", str(root), "--model", "m", "-o", "t.csv", "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_tags_with_a_real_model_folder(tmp_path, capsys, tiny_model_dir):
    model_dir = tiny_model_dir
    from geoswc.cli import main
    from geoswc.geolocator import Geolocator

    root = tmp_path / "archive"
    make_archive(root, 5)
    out = tmp_path / "tags.jsonl"
    assert main(["tag", str(root), "--model", str(model_dir), "-o", str(out), "--workers", "0"]) == 0
    assert f"5 ok, 1 error rows in {out}" in capsys.readouterr().out
    rows = rows_by_path(out, "jsonl")
    model = Geolocator.from_pretrained(model_dir)
    # Independent of the pipeline: the model on each photo decoded and transformed on its own.
    for path in sorted(rows):
        if path.endswith(".png"):
            expected = model.predict_batch(model.load_pixels(path)[None])[0]
            assert rows[path]["lat"] == pytest.approx(expected["lat"], abs=1e-4)
            assert rows[path]["lon"] == pytest.approx(expected["lon"], abs=1e-4)
            assert rows[path]["cell_token"] == expected["cell_token"]
            assert rows[path]["method"] == expected["method"]
