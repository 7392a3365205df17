"""What a tag run and ``geoswc similar`` refuse (docs/reliability.md, "Tagging"): links planted at the files a run
writes, CSV cells a spreadsheet would run, an EXIF folder that cannot be written, damaged or non-finite kept
embeddings, and the exit status of a refusal by the system."""

import csv
import errno
import io
import os
import sys

import numpy as np
import pytest

from geoswc.cli import main
from geoswc.tagging.files import OutputError
from geoswc.tagging.journal import EmbeddingJournal
from geoswc.tagging.output import escape_cell, read_rows, unescape_cell
from geoswc.tagging.run import tag_photos
from test_tag import MeanColour, expected_latlon, save

VICTIM_TEXT = "a file of the user's that a link points at\n"


def archive(tmp_path, n=2, ext="png"):
    root = tmp_path / "archive"
    for i in range(n):
        save(root / f"img{i}.{ext}", rgb=(40 + 60 * i, 200 - 50 * i, 90))
    return root


def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


@pytest.mark.parametrize("planted", ["tags.csv.lock", "tags.csv.embeddings-00000.paths", "tags.csv.run.json"])
def test_a_link_planted_at_a_file_of_the_run_is_refused_and_its_target_kept(tmp_path, planted):
    root, target = archive(tmp_path), victim(tmp_path)
    out = tmp_path / "tags.csv"
    os.symlink(target, tmp_path / planted)
    with pytest.raises(OutputError, match=f"{planted}: it is a symbolic link"):
        tag_photos([str(root)], model=MeanColour(), out=out, workers=0)
    assert target.read_text() == VICTIM_TEXT
    assert not out.exists()


def test_a_dangling_link_at_the_output_is_refused_not_created_through(tmp_path):
    root = archive(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "planted.csv"
    elsewhere.parent.mkdir()
    out = tmp_path / "tags.csv"
    os.symlink(elsewhere, out)
    with pytest.raises(OutputError, match="tags.csv: it is a symbolic link"):
        tag_photos([str(root)], model=MeanColour(), out=out, workers=0)
    assert not elsewhere.exists() and os.path.islink(out)


def test_the_embedding_journal_opens_its_files_without_following_links(tmp_path):
    # The journal is opened after the run's checks; a link planted in between is still not followed.
    target = victim(tmp_path)
    out = tmp_path / "tags.csv"
    os.symlink(target, tmp_path / "tags.csv.embeddings-00000.paths")
    with pytest.raises(OutputError, match="embeddings-00000.paths: it is a symbolic link"):
        EmbeddingJournal(str(out), 0, 4)
    assert target.read_text() == VICTIM_TEXT


def test_a_full_disk_at_the_journal_close_names_the_file(tmp_path):
    out = tmp_path / "tags.csv"
    journal = EmbeddingJournal(str(out), 0, 4)

    class FullDisk:
        def close(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    journal._vectors.close()
    journal._vectors = FullDisk()
    with pytest.raises(OSError) as raised:
        journal.close()
    assert f"cannot write {out}.embeddings-00000.f16: No space left on device" == str(raised.value)


@pytest.mark.parametrize(
    "text", ["=1+2", "'=1+2", "''@x", "+41 22", "-rf", "@SUM(A1)", "'abc", "''", "", "plain", "a=b", "-"]
)
def test_escaped_cells_read_back_as_written(text):
    escaped = escape_cell(text)
    assert unescape_cell(escaped) == text
    assert escaped[:1] not in ("=", "+", "-", "@")


def test_a_formula_file_name_is_escaped_in_csv_and_read_back_unchanged(tmp_path, monkeypatch):
    name = "=1+2+cmd|calc!A1.jpg"
    rgb = (20, 200, 30)  # a southern latitude: the lat cell is a negative number, never escaped
    save(tmp_path / "archive" / name, rgb=rgb)
    monkeypatch.chdir(tmp_path / "archive")
    out = tmp_path / "tags.csv"
    tag_photos([name], model=MeanColour(), out=out, workers=0)
    line = out.read_text().splitlines()[1]
    assert line.startswith(f"'{name},ok,")
    cells = next(csv.reader(io.StringIO(line)))
    lat, lon = expected_latlon(rgb)
    assert cells[3].startswith("-") and float(cells[3]) == pytest.approx(lat, abs=1.0)
    (row,) = read_rows(str(out), "csv")
    assert row["path"] == name and row["lat"] == pytest.approx(lat, abs=1.0)
    # Resuming reads the escaped name as the photo it is: nothing is tagged twice.
    summary = tag_photos([name], model=MeanColour(), out=out, workers=0, resume=True)
    assert (summary["resumed"], summary["tagged"], summary["ok"]) == (1, 0, 1)
    tag_photos([name], model=MeanColour(), out=out, workers=0, overwrite=True, raw_csv=True)
    assert out.read_text().splitlines()[1].startswith(f"{name},ok,")


def test_an_exif_folder_that_cannot_be_written_fails_before_tagging(tmp_path):
    root = archive(tmp_path, ext="jpg")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the copies' folder would go\n")
    out = tmp_path / "tags.csv"
    with pytest.raises(OutputError, match=f"cannot write EXIF copies into {blocker / 'copies'}"):
        tag_photos([str(root)], model=MeanColour(), out=out, workers=0, write_exif=str(blocker / "copies"))
    assert not out.exists() and not (tmp_path / "tags.csv.run.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_exif_folder_fails_before_tagging(tmp_path):
    root = archive(tmp_path, ext="jpg")
    copies = tmp_path / "copies"
    copies.mkdir()
    copies.chmod(0o555)
    out = tmp_path / "tags.csv"
    try:
        with pytest.raises(OutputError, match="cannot write EXIF copies into .*copies: Permission denied"):
            tag_photos([str(root)], model=MeanColour(), out=out, workers=0, write_exif=str(copies))
    finally:
        copies.chmod(0o755)
    assert not out.exists()


def refused_folder(tmp_path):
    """A folder the system refuses to create files in, for whoever runs the tests."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        return "/proc"  # no file can be created there, not even by root
    pytest.skip("no folder refuses root here")


def test_a_refused_output_exits_1_with_one_line_naming_it(tmp_path, tiny_model_dir, capsys):
    root = archive(tmp_path)
    out = os.path.join(refused_folder(tmp_path), "tags.csv")
    args = ["tag", str(root), "--model", str(tiny_model_dir), "-o", out, "--workers", "0", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out}.lock" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("safety_similar")
    root = archive(tmp, n=3)
    out = tmp / "tags.csv"
    assert main(["tag", str(root), "--model", str(tiny_model_dir), "-o", str(out), "--workers", "0"]) == 0
    return root, out


def similar(tagged, tiny_model_dir, tmp_path, archive_out):
    root, _ = tagged
    args = ["similar", str(root / "img0.png"), "--model", str(tiny_model_dir), "--archive", str(archive_out)]
    return main([*args, "-o", str(tmp_path / "similar.csv")])


def copy_run(tagged, tmp_path):
    """A copy of the tagged run's output and embeddings, to damage."""
    _, out = tagged
    copy = tmp_path / "tags.csv"
    for suffix in ("", ".embeddings.npy", ".embeddings.json"):
        (tmp_path / f"tags.csv{suffix}").write_bytes(out.with_name(out.name + suffix).read_bytes())
    return copy


@pytest.mark.parametrize(
    "index, message",
    [
        ("[1, 2]", "expected the embeddings index of a geoswc tag run, got list"),
        ('{"version": 1, "fingerprint": "ab"}', "has no list of photo paths ('paths')"),
        ('{"version": 1, "paths": [', "not valid JSON"),
    ],
)
def test_similar_names_a_damaged_embeddings_index(tagged, tiny_model_dir, tmp_path, capsys, index, message):
    copy = copy_run(tagged, tmp_path)
    (tmp_path / "tags.csv.embeddings.json").write_text(index)
    assert similar(tagged, tiny_model_dir, tmp_path, copy) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{copy}.embeddings.json" in err and message in err


def test_similar_names_a_cut_embeddings_file(tagged, tiny_model_dir, tmp_path, capsys):
    copy = copy_run(tagged, tmp_path)
    npy = tmp_path / "tags.csv.embeddings.npy"
    npy.write_bytes(npy.read_bytes()[:-100])
    assert similar(tagged, tiny_model_dir, tmp_path, copy) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{npy} is not a readable .npy array" in err


def test_similar_refuses_embeddings_that_are_not_finite(tagged, tiny_model_dir, tmp_path, capsys):
    copy = copy_run(tagged, tmp_path)
    npy = tmp_path / "tags.csv.embeddings.npy"
    vectors = np.load(npy, mmap_mode="r+")
    vectors[1] = np.nan
    vectors.flush()
    del vectors
    assert similar(tagged, tiny_model_dir, tmp_path, copy) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{npy} holds 1 embeddings that are not finite" in err
    assert not (tmp_path / "similar.csv").exists()


def test_similar_csv_escapes_text_cells_unless_raw(tmp_path):
    from geoswc.tagging.similar import SIMILAR_COLUMNS, write_similar

    row = {**dict.fromkeys(SIMILAR_COLUMNS), "query": "=HYPERLINK(1)", "rank": 1, "similarity": -0.25}
    row.update(path="@photo.jpg", lat=-33.86, lon=151.2, place="-Town")
    out = tmp_path / "similar.csv"
    write_similar(str(out), [row])
    cells = list(csv.reader(io.StringIO(out.read_text())))[1]
    assert cells[:7] == ["'=HYPERLINK(1)", "1", "-0.25", "'@photo.jpg", "-33.86", "151.2", "'-Town"]
    write_similar(str(out), [row], raw=True)
    assert list(csv.reader(io.StringIO(out.read_text())))[1][:4] == [
        "=HYPERLINK(1)",
        "1",
        "-0.25",
        "@photo.jpg",
    ]
