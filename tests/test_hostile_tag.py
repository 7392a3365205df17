"""`geoswc tag` against hostile conditions: an EXIF folder inside the inputs, an output resumed with other
settings, from another spelling of the inputs or by two runs at once, damaged outputs, and a full disk.

The model is `MeanColour` of test_tag (a photo's mean colour mapped to a position); the full disk is a real
file-size limit (RLIMIT_FSIZE) in a subprocess, which makes writes fail the way ENOSPC does, also as root.
"""

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import piexif
import pytest
from PIL import Image

from conftest import two_rank_launch
from geoswc.tagging.run import summary_lines, tag_photos
from geoswc.tagging.output import read_rows
from test_tag import MeanColour

TESTS = Path(__file__).resolve().parent


def make_archive(root, n=6, ext="png"):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        folder = root / f"trip{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), (20 * i, 200 - 20 * i, 90)).save(folder / f"img{i}.{ext}")
    return root


def tree_digest(root):
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def paths_of(out, fmt):
    return [row["path"] for row in read_rows(str(out), fmt)]


class Counting(MeanColour):
    """MeanColour that counts its model calls (a refused run must not reach the model)."""

    def __init__(self):
        self.calls = 0

    def predict_batch(self, pixels):
        self.calls += 1
        return super().predict_batch(pixels)


# --------------------------------------------------------------------------------------------- --write-exif


@pytest.mark.parametrize(
    "where",
    ["inside-root", "root-itself", "contains-root", "file-folder", "symlink-into-root", "inside-second-root"],
)
def test_write_exif_overlapping_the_inputs_is_refused_before_any_photo_is_read(tmp_path, where):
    root = tmp_path / "archive"
    make_archive(root, ext="jpg")
    # The photo a copy of trip0/img0.jpg would replace if the copies went to archive/copies/.
    (root / "copies" / "trip0").mkdir(parents=True)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(root / "copies" / "trip0" / "img0.jpg")
    other = tmp_path / "other"
    make_archive(other, n=2, ext="jpg")
    before = tree_digest(tmp_path)
    inputs = [str(root)]
    target = {
        "inside-root": root / "copies",
        "root-itself": root,
        "contains-root": tmp_path,
        "file-folder": other / "trip0" / "tagged",
        "symlink-into-root": tmp_path / "link" / "copies",
        "inside-second-root": other / "x",  # inside an input folder, though no photo lies right there
    }[where]
    if where == "symlink-into-root":
        os.symlink(root, tmp_path / "link")
    if where == "file-folder":
        inputs.append(str(other / "trip0" / "img0.jpg"))  # a file named on its own: its folder is protected
    if where == "inside-second-root":
        inputs.append(str(other))
    model = Counting()
    with pytest.raises(ValueError, match="replace the originals") as info:
        tag_photos(inputs, model=model, out=str(tmp_path / "tags.csv"), workers=0, write_exif=str(target))
    assert "\n" not in str(info.value)
    assert model.calls == 0
    assert not (tmp_path / "tags.csv").exists()
    assert tree_digest(tmp_path) == before


def test_write_exif_next_to_the_inputs_is_allowed(tmp_path):
    """Outside every input root and input file's folder, even under their common parent."""
    make_archive(tmp_path / "photos" / "2019", n=2, ext="jpg")
    make_archive(tmp_path / "photos" / "2020", n=2, ext="jpg")
    summary = tag_photos(
        [str(tmp_path / "photos" / "2019"), str(tmp_path / "photos" / "2020")],
        model=MeanColour(),
        out=str(tmp_path / "tags.csv"),
        workers=0,
        write_exif=str(tmp_path / "photos" / "tagged"),
    )
    assert summary["exif_written"] == 4
    assert (tmp_path / "photos" / "tagged" / "2019" / "trip0" / "img0.jpg").is_file()


def test_existing_copies_are_kept_unless_overwrite(tmp_path):
    root = make_archive(tmp_path / "archive", n=2, ext="jpg")
    exif = tmp_path / "tagged"
    (exif / "trip0").mkdir(parents=True)
    (exif / "trip0" / "img0.jpg").write_bytes(b"someone else's file")
    out = tmp_path / "tags.csv"
    summary = tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, write_exif=str(exif))
    assert (exif / "trip0" / "img0.jpg").read_bytes() == b"someone else's file"
    assert (summary["exif_written"], summary["exif_skipped"], summary["exif_existing"]) == (1, 1, 1)
    assert [row["status"] for row in read_rows(str(out), "csv")] == ["ok", "ok"]
    assert any("1 existing copies kept" in line for line in summary_lines(summary))

    summary = tag_photos(
        [str(root)], model=MeanColour(), out=str(out), workers=0, write_exif=str(exif), overwrite=True
    )
    assert (summary["exif_written"], summary["exif_skipped"]) == (2, 0)
    gps = piexif.load(str(exif / "trip0" / "img0.jpg"))["GPS"]
    assert gps[piexif.GPSIFD.GPSMapDatum] == b"WGS-84"


def test_copies_keep_the_mode_of_the_original_and_a_symlink_in_the_copies_cannot_reach_an_original(tmp_path):
    root = make_archive(tmp_path / "archive", n=2, ext="jpg")
    (root / "trip0" / "img0.jpg").chmod(0o640)
    (root / "trip1" / "img1.jpg").chmod(0o604)
    exif = tmp_path / "tagged"
    tag_photos([str(root)], model=MeanColour(), out=str(tmp_path / "a.csv"), workers=0, write_exif=str(exif))
    assert (exif / "trip0" / "img0.jpg").stat().st_mode & 0o777 == 0o640
    assert (exif / "trip1" / "img1.jpg").stat().st_mode & 0o777 == 0o604
    assert sorted(p.name for p in exif.rglob("*")) == ["img0.jpg", "img1.jpg", "trip0", "trip1"]

    # A folder of the copies that is a symlink into the inputs would put a copy over an original.
    before = tree_digest(root)
    exif2 = tmp_path / "tagged2"
    exif2.mkdir()
    os.symlink(root / "trip0", exif2 / "trip0")
    with pytest.raises(ValueError, match="replace the originals"):
        tag_photos(
            [str(root)], model=MeanColour(), out=str(tmp_path / "b.csv"), workers=0, write_exif=str(exif2)
        )
    assert tree_digest(root) == before


# --------------------------------------------------------------------------------------------- resume identity


@pytest.mark.parametrize("fmt", ["csv", "geojson"])
def test_resume_matches_photos_by_real_path_and_keeps_their_spelling(tmp_path, monkeypatch, fmt):
    root = make_archive(tmp_path / "archive")
    monkeypatch.chdir(tmp_path)
    out = f"tags.{fmt}"
    tag_photos(["archive"], model=MeanColour(), out=out, workers=0)
    first = paths_of(out, fmt)
    assert len(first) == 6 and all(not os.path.isabs(path) for path in first)

    summary = tag_photos([str(root)], model=MeanColour(), out=out, workers=0, resume=True)
    assert (summary["tagged"], summary["resumed"], summary["ok"]) == (0, 6, 6)
    assert paths_of(out, fmt) == first

    os.symlink(root, tmp_path / "alias")
    summary = tag_photos(["alias/"], model=MeanColour(), out=out, workers=0, resume=True)
    assert summary["tagged"] == 0

    Image.new("RGB", (40, 30), (5, 5, 5)).save(root / "trip0" / "new.png")
    summary = tag_photos([str(root)], model=MeanColour(), out=out, workers=0, resume=True)
    assert (summary["tagged"], summary["ok"]) == (1, 7)
    paths = paths_of(out, fmt)
    assert len(paths) == len(set(paths)) == 7
    assert str(root / "trip0" / "new.png") in paths  # spelled as this run named it


def test_resume_with_relative_inputs_from_another_folder_is_refused(tmp_path, monkeypatch):
    root = make_archive(tmp_path / "archive")
    monkeypatch.chdir(tmp_path)
    tag_photos(["archive"], model=MeanColour(), out="tags.csv", workers=0)
    monkeypatch.chdir(root)
    with pytest.raises(ValueError, match="was started in"):
        tag_photos(["."], model=MeanColour(), out=str(tmp_path / "tags.csv"), workers=0, resume=True)
    # Absolute inputs are fine from anywhere.
    summary = tag_photos(
        [str(root)], model=MeanColour(), out=str(tmp_path / "tags.csv"), workers=0, resume=True
    )
    assert summary["tagged"] == 0


class Optioned(MeanColour):
    """MeanColour that takes (and ignores) predict options such as ``head`` and ``mode``."""

    def predict_batch(self, pixels, **options):
        return super().predict_batch(pixels)


class OtherModel(Optioned):
    pass


@pytest.mark.parametrize(
    "change, named",
    [
        ({"precision": "city"}, "precision 'exact' (now 'city')"),
        ({"model": OtherModel()}, "model class"),
        ({"head": "ce"}, "head"),
        ({"predict_options": {"mode": "rrm"}}, "predict options"),
        ({"write_exif": "EXIF"}, "write exif"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path, change, named):
    root = make_archive(tmp_path / "archive", ext="jpg")
    out = tmp_path / "tags.jsonl"
    tag_photos([str(root)], model=Optioned(), out=str(out), workers=0)
    data = out.read_bytes()
    kwargs = dict(model=Optioned(), out=str(out), workers=0, resume=True)
    kwargs.update(change)
    if kwargs.get("write_exif"):
        kwargs["write_exif"] = str(tmp_path / "exif")
    with pytest.raises(ValueError, match="started with other settings: .*" + re.escape(named)) as info:
        tag_photos([str(root)], **kwargs)
    assert "\n" not in str(info.value)
    assert out.read_bytes() == data
    assert not (tmp_path / "exif").exists()


def test_run_record_sidecar_and_overwrite(tmp_path):
    root = make_archive(tmp_path / "archive")
    out = tmp_path / "tags.csv"
    tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, precision="city")
    record = json.loads(Path(f"{out}.run.json").read_text())
    assert record["identity"]["precision"] == "city"
    assert record["identity"]["model"]["class"] == "test_tag.MeanColour"
    assert not Path(f"{out}.lock").exists()  # the lock is gone once the run ends
    tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, overwrite=True)
    assert json.loads(Path(f"{out}.run.json").read_text())["identity"]["precision"] == "exact"
    summary = tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, resume=True)
    assert summary["tagged"] == 0


def test_geolocator_identity_names_the_model(tmp_path, tiny_model_dir):
    from geoswc.geolocator import FORMAT_VERSION, Geolocator

    root = make_archive(tmp_path / "archive", n=2)
    out = tmp_path / "tags.jsonl"
    tag_photos([str(root)], model=str(tiny_model_dir), out=str(out), workers=0)
    model = json.loads(Path(f"{out}.run.json").read_text())["identity"]["model"]
    loaded = Geolocator.from_pretrained(tiny_model_dir)
    assert model["fingerprint"] == loaded.fingerprint
    assert model["format_version"] == FORMAT_VERSION
    assert model["folder"] == os.path.realpath(tiny_model_dir)
    head = json.loads(Path(f"{out}.run.json").read_text())["identity"]["head"]
    other = next(kind for kind in loaded.head_names if kind != head)
    with pytest.raises(ValueError, match=f"head '{head}' \\(now '{other}'\\)"):
        tag_photos([str(root)], model=loaded, out=str(out), workers=0, resume=True, head=other)
    # The same model loaded in Python (its folder unknown) resumes the run.
    assert tag_photos([str(root)], model=loaded, out=str(out), workers=0, resume=True)["tagged"] == 0


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path):
    root = make_archive(tmp_path / "archive")
    out = tmp_path / "tags.csv"
    with open(f"{out}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for kwargs in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(FileExistsError, match="another geoswc tag run") as info:
                tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, **kwargs)
            assert "\n" not in str(info.value)
        assert not out.exists() and not Path(f"{out}.run.json").exists()
    assert tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0)["ok"] == 6


TWO_RANKS = """
import sys
sys.path.insert(0, {tests!r})
from test_tag import MeanColour
from geoswc.tagging.run import Ranks, tag_photos
ranks = Ranks()
try:
    tag_photos([{root!r}], model=MeanColour(), out=sys.argv[1], workers=0, ranks=ranks)
except FileExistsError as err:
    print(f"rank {{ranks.rank}}: {{err}}", flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
def test_with_two_ranks_a_held_lock_stops_every_rank_at_once(tmp_path):
    """Only rank 0 locks; the other rank must fail with the same error instead of waiting for it."""
    root = make_archive(tmp_path / "archive", n=4)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(TESTS), root=str(root)))
    out = tmp_path / "tags.jsonl"
    launch = [*two_rank_launch(), str(script), str(out)]
    with open(f"{out}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run(launch, timeout=240, capture_output=True, text=True)
    assert done.returncode != 0
    assert "rank 0: another geoswc tag run" in done.stdout and "rank 1: another geoswc tag run" in done.stdout
    assert not out.exists() and not Path(f"{out}.run.json").exists()


# --------------------------------------------------------------------------------------------- damaged outputs


def damage_line(out, number, transform):
    lines = out.read_bytes().split(b"\n")
    lines[number - 1] = transform(lines[number - 1])
    out.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    "fmt, damage, reason",
    [
        ("csv", lambda line: b'"' + line, "line 3"),  # a stray opening quote
        ("csv", lambda line: line.replace(b"trip", b'tr"ip', 1), "line 3"),  # a quote inside a plain field
        ("csv", lambda line: line.split(b",")[0] + b",ok", "line 3"),  # a short row
        ("csv", lambda line: line + b",extra", "line 3"),  # a long row
        ("csv", lambda line: line.replace(b",ok,", b",maybe,"), "line 3"),  # an unknown status
        ("jsonl", lambda line: json.dumps({"path": "x.png"}).encode(), "line 3"),  # no status
        ("jsonl", lambda line: line[:-5], "line 3"),  # cut inside, not at the end
    ],
)
def test_damaged_rows_before_the_end_are_an_error_naming_the_line(tmp_path, fmt, damage, reason):
    root = make_archive(tmp_path / "archive")
    out = tmp_path / f"tags.{fmt}"
    tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0)
    damage_line(out, 3, damage)
    data = out.read_bytes()
    with pytest.raises(ValueError, match=f"{out}.* {reason}") as info:
        tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, resume=True)
    assert "\n" not in str(info.value)
    assert out.read_bytes() == data  # nothing cut, nothing appended


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_only_a_torn_last_row_is_repaired(tmp_path, fmt):
    root = make_archive(tmp_path / "archive")
    out = tmp_path / f"tags.{fmt}"
    tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0)
    reference = out.read_bytes()
    out.write_bytes(reference[:-30])  # the last row cut short (no trailing newline)
    summary = tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, resume=True)
    assert (summary["resumed"], summary["tagged"]) == (5, 1)
    assert out.read_bytes() == reference


def test_damaged_final_outputs_are_an_error_naming_the_file(tmp_path):
    root = make_archive(tmp_path / "archive")
    out = tmp_path / "tags.geojson"
    tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0)
    collection = json.loads(out.read_text())
    del collection["features"][2]["properties"]["status"]
    out.write_text(json.dumps(collection))
    with pytest.raises(ValueError, match=f"{out}.*feature 3") as info:
        tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, resume=True)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- full disk

LIMITED = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_tag import MeanColour
from geoswc.tagging.run import tag_photos
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    tag_photos([{root!r}], model=MeanColour(), out={out!r}, workers=0, batch_size=2, write_exif={exif!r})
except Exception as err:
    print(type(err).__name__, isinstance(err, (ValueError, FileNotFoundError, FileExistsError)))
    print(err)
    sys.exit(3)
"""


def run_limited(tmp_path, root, out, *, limit, exif=None):
    script = tmp_path / "limited.py"
    script.write_text(LIMITED.format(tests=str(TESTS), root=str(root), out=str(out), exif=exif, limit=limit))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    kind, message = done.stdout.splitlines()[-2:]
    return kind, message


@pytest.mark.slow
def test_a_full_disk_while_writing_the_output_is_one_line_naming_it_and_resumable(tmp_path):
    root = make_archive(tmp_path / "archive", n=20)
    out = tmp_path / "tags.csv"
    kind, message = run_limited(tmp_path, root, out, limit=1500)
    assert kind.endswith(" True"), kind  # printed by the CLI as one line
    assert str(out) in message and "File too large" in message
    assert 0 < out.stat().st_size <= 1500
    summary = tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, resume=True)
    paths = paths_of(out, "csv")
    assert summary["ok"] == len(paths) == len(set(paths)) == 20


@pytest.mark.slow
def test_a_full_disk_while_writing_an_exif_copy_is_one_line_naming_it_and_leaves_no_temporary_file(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "big.jpg", quality=95)
    before = tree_digest(root)
    exif = tmp_path / "tagged"
    kind, message = run_limited(tmp_path, root, tmp_path / "tags.csv", limit=8000, exif=str(exif))
    assert kind.endswith(" True"), kind
    assert str(exif / "big.jpg") in message and "File too large" in message
    assert [p for p in exif.rglob("*") if p.is_file()] == []
    assert tree_digest(root) == before
