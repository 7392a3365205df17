"""Hostile inputs for the data readers and the shard writer: unreadable photos, broken msgpack files, bad CSVs.

Every bad input must be counted (shards) or reported as one line naming the file (CSV readers), never abort a
job with a traceback.
"""

import errno
import json
import os
import tarfile
import threading
from pathlib import Path

import msgpack
import numpy as np
import pandas as pd
import pytest

import geoswc.data.shards as shards_module
from geoswc.cli import main
from geoswc.data.images import encode_jpeg
from geoswc.data.metadata import Exclusions, iter_msgpack_records, read_locations, read_metadata
from geoswc.data.shards import write_shards
from geoswc.geocells.io import read_coordinates

N_PHOTOS = 12


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_jpeg(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), quality=80)


def _shard_contents(out: Path, summary: dict) -> list:
    """The ids of every sample in the summary's shards, checking each shard's count against its tar."""
    ids = []
    for shard in summary["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        assert len(metas) == shard["count"] > 0
        ids += [m["id"] for m in metas]
    return ids


@pytest.fixture
def photos(tmp_path):
    """``N_PHOTOS`` small JPEGs under ``root`` and their metadata (one author each)."""
    root = tmp_path / "images"
    ids = [f"aa/{i:010d}.jpg" for i in range(N_PHOTOS)]
    for i, img_id in enumerate(ids):
        (root / img_id).parent.mkdir(parents=True, exist_ok=True)
        (root / img_id).write_bytes(_jpeg(i))
    meta = pd.DataFrame(
        {
            "IMG_ID": ids,
            "AUTHOR": [f"{i}@N00" for i in range(N_PHOTOS)],
            "LAT": np.linspace(-40, 40, N_PHOTOS),
            "LON": np.linspace(-100, 100, N_PHOTOS),
        }
    )
    csv = tmp_path / "meta.csv"
    meta.to_csv(csv, index=False)
    return root, read_metadata(csv), csv


def _deny(monkeypatch, path: Path) -> None:
    """Make reading ``path`` fail with 'permission denied' (chmod is no obstacle to root: patch the read)."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_read_bytes = shards_module.read_bytes

    def read_bytes(file):
        if Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_read_bytes(file)

    monkeypatch.setattr(shards_module, "read_bytes", read_bytes)


# -- 1. an unreadable photo, an I/O error or a non-bytes msgpack image is a skip, not the end of the job --------


def test_unreadable_photos_are_counted_and_retried_by_a_rerun(photos, tmp_path, monkeypatch, capsys):
    root, meta, csv = photos
    ids = meta["IMG_ID"].tolist()
    denied = root / ids[1]
    _deny(monkeypatch, denied)
    io_error = Path("/proc/self/mem")  # reading it from offset 0 fails with EIO: a real I/O error
    has_io_error = io_error.exists()
    if has_io_error:
        (root / ids[2]).unlink()
        (root / ids[2]).symlink_to(io_error)
    out = tmp_path / "shards"
    args = ["data", "shards", str(csv), "--images", str(root), "-o", str(out), "--samples-per-shard", "5"]
    for _ in range(2):  # the rerun must not stop either
        assert main([*args, "--workers", "1"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        n_bad = 1 + has_io_error
        assert summary["skipped_unreadable"] == n_bad
        assert summary["written"] == N_PHOTOS - n_bad
        counted = ("written", "skipped_corrupt", "skipped_missing", "skipped_unreadable", "excluded_author")
        assert sum(summary[key] for key in counted) + summary["excluded_id"] == N_PHOTOS
        reasons = {s["id"]: (s["reason"], s["detail"]) for s in summary["skipped"]}
        assert reasons[ids[1]][0] == "unreadable" and "permission denied" in reasons[ids[1]][1].lower()
        if has_io_error:
            assert reasons[ids[2]][0] == "unreadable" and "input/output error" in reasons[ids[2]][1].lower()
        assert sorted(_shard_contents(out, summary)) == sorted(
            set(ids) - {ids[1], ids[2] if has_io_error else ""}
        )
        assert "skipped_unreadable" in capsys.readouterr().out
    # Once the files can be read, a rerun picks them up (an unreadable file may be a passing condition).
    monkeypatch.undo()
    if os.geteuid() != 0:
        denied.chmod(0o644)
    if has_io_error:
        (root / ids[2]).unlink()
        (root / ids[2]).write_bytes(_jpeg(2))
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == N_PHOTOS and summary["skipped_unreadable"] == 0
    assert sorted(_shard_contents(out, summary)) == sorted(ids)


def _pack(records) -> bytes:
    return b"".join(msgpack.packb(r) for r in records)


def test_msgpack_images_that_are_not_bytes_are_skipped(photos, tmp_path):
    root, meta, _ = photos
    ids = meta["IMG_ID"].tolist()
    records = [
        {"id": ids[0], "image": (root / ids[0]).read_bytes()},
        {"id": ids[1], "image": "a str where the JPEG should be"},
        {"id": ids[2], "image": 2**63 - 1},  # never a size to allocate
        {"id": ids[3], "image": -1},
        {"id": ids[4], "image": 7},
        {"id": ids[5], "image": None},
        {"id": ids[6], "image": (root / ids[6]).read_bytes()},
    ]
    (tmp_path / "a.msg").write_bytes(_pack(records))
    for _ in range(2):  # the rerun must not stop either
        summary = write_shards(meta, tmp_path / "out", msgpack_paths=[tmp_path / "a.msg"], progress=False)
        assert summary["written"] == 2 and summary["skipped_malformed"] == 5
        skipped = {s["id"]: s for s in summary["skipped"] if s["reason"] == "malformed"}
        assert set(skipped) == set(ids[1:6])
        assert "str" in skipped[ids[1]]["detail"] and "int" in skipped[ids[2]]["detail"]
        assert sorted(_shard_contents(tmp_path / "out", summary)) == [ids[0], ids[6]]


def test_iter_msgpack_records_goes_past_a_malformed_record(tmp_path):
    path = tmp_path / "a.msg"
    path.write_bytes(
        _pack(
            [
                {"id": "1.jpg", "image": b"one"},
                {"id": "2.jpg", "image": -1},
                {"image": b"no id"},
                ["not", "a", "map"],
                {"id": "3.jpg", "image": "text"},
                {"id": "4.jpg", "image": b"four"},
            ]
        )
    )
    assert list(iter_msgpack_records([path])) == [("1.jpg", b"one"), ("4.jpg", b"four")]


# -- 2. msgpack accounting: duplicates, truncated and damaged files, records without an id --------------------


def test_msgpack_every_record_lands_in_exactly_one_count(photos, tmp_path):
    root, meta, _ = photos
    ids = meta["IMG_ID"].tolist()

    def good(i, img_id=None):
        return {"id": img_id or ids[i], "image": (root / ids[i]).read_bytes()}

    files = {
        "a.msg": [
            good(0),
            good(1),
            good(0),  # duplicate within the file
            {"image": (root / ids[2]).read_bytes()},  # no id
            [1, 2, 3],  # not a map
            {"id": None, "image": b"x"},  # unusable id
            good(2, "zz/unlisted.jpg"),
            {"id": ids[4], "image": b"not a jpeg"},  # corrupt
            good(5),  # excluded by id
            good(5),  # ... and its duplicate
            good(6),
        ],
        "b.msg": [good(1), good(7), good(4)],  # a duplicate of a.msg's; a good copy of a corrupt one
        "d.msg": [good(6)],  # only a duplicate: its shard is emptied
    }
    for name, records in files.items():
        (tmp_path / name).write_bytes(_pack(records))
    n_records = sum(len(r) for r in files.values())
    # A truncated file: the last record is cut in half; the complete ones before it are kept.
    truncated = _pack([good(8), good(9)])
    cut = len(_pack([good(8)])) + 40
    (tmp_path / "c.msg").write_bytes(truncated[:cut])
    n_records += 1
    # A damaged file: bytes that are no msgpack between two records; the record after them is recovered.
    (tmp_path / "e.msg").write_bytes(_pack([good(10)]) + b"\xc1\xc1garbage" + _pack([good(11)]))
    n_records += 2
    paths = [tmp_path / n for n in ("a.msg", "b.msg", "c.msg", "d.msg", "e.msg")]
    bench = tmp_path / "bench.csv"
    pd.DataFrame({"IMG_ID": [ids[5].split("/")[-1]], "LAT": [0.0], "LON": [0.0]}).to_csv(bench, index=False)

    out = tmp_path / "out"
    results = []
    for workers in (2, 1):  # the rerun resumes from the markers and must agree
        summary = write_shards(
            meta,
            out,
            msgpack_paths=paths,
            exclusions=Exclusions.from_files([bench]),
            samples_per_shard=2,
            workers=workers,
            progress=False,
        )
        written = _shard_contents(out, summary)
        assert sorted(written) == sorted(ids[i] for i in (0, 1, 4, 6, 7, 8, 10, 11))
        assert summary["written"] == len(written) == 8
        assert summary["skipped_duplicate"] == 4
        assert summary["skipped_malformed"] == 3
        assert summary["skipped_unlisted"] == 1
        assert summary["skipped_corrupt"] == 1
        assert summary["excluded_id"] == 1 and summary["excluded_author"] == 0
        per_record = (
            "written",
            "skipped_corrupt",
            "skipped_malformed",
            "skipped_duplicate",
            "skipped_unlisted",
            "excluded_author",
            "excluded_id",
        )
        assert sum(summary[key] for key in per_record) == summary["records"] == n_records
        # Photo 9 was in the cut record only: missing, with the photos in no file at all (2, 3).
        assert summary["skipped_missing"] == 3
        missing = {s["id"] for s in summary["skipped"] if s["reason"] == "missing"}
        assert missing == {ids[2], ids[3], ids[9]}
        assert summary["truncated_files"] == 1 and summary["damaged_files"] == 1
        problems = {(Path(f["file"]).name, f["reason"]) for f in summary["file_errors"]}
        assert problems == {("c.msg", "truncated"), ("e.msg", "damaged")}
        assert not list(out.glob("*.tmp"))
        results.append(
            (summary["shards"], {s["name"]: (out / s["name"]).read_bytes() for s in summary["shards"]})
        )
    assert results[0] == results[1]


def test_msgpack_files_that_cannot_be_opened_are_counted(photos, tmp_path):
    root, meta, _ = photos
    ids = meta["IMG_ID"].tolist()
    (tmp_path / "a.msg").write_bytes(_pack([{"id": ids[0], "image": (root / ids[0]).read_bytes()}]))
    (tmp_path / "b.msg").mkdir()  # matched by a glob, cannot be read
    paths = [tmp_path / "a.msg", tmp_path / "b.msg"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "c.msg")  # opening a FIFO without a writer would block forever
        paths.append(tmp_path / "c.msg")
    result = {}

    def run():
        result["summary"] = write_shards(meta, tmp_path / "out", msgpack_paths=paths, progress=False)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert "summary" in result, "write_shards blocked on a msgpack path that is not a regular file"
    summary = result["summary"]
    assert summary["written"] == 1 and summary["unreadable_files"] == len(paths) - 1
    errors = [(Path(f["file"]).name, f["reason"]) for f in summary["file_errors"]]
    assert errors == [(p.name, "unreadable") for p in paths[1:]]


# -- 3. bad CSVs: one ValueError/FileNotFoundError naming the file (and the line), one line on stderr ----------

BAD_CSVS = {
    # name: (content, the line the message must name)
    "ragged": (b"IMG_ID,AUTHOR,LAT,LON\na.jpg,u,1,2\nb.jpg,u,3,4,5\n", 3),
    "ragged_first_row": (b"IMG_ID,AUTHOR,LAT,LON\na.jpg,u,1,2,9\nb.jpg,u,3,4\n", 2),
    "not_utf8": (b"IMG_ID,AUTHOR,LAT,LON\na.jpg,u,1,2\nb\xff\xfe.jpg,u,3,4\n", 3),
    "unterminated_quote": (b'IMG_ID,AUTHOR,LAT,LON\na.jpg,u,1,2\n"b.jpg,u,3,4\n', None),
    "dir": (None, None),
}


def _bad_csv(tmp_path: Path, name: str) -> Path:
    content, _ = BAD_CSVS[name]
    path = tmp_path / f"{name}.csv"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


def _check_message(err: Exception, path: Path, name: str) -> None:
    message = str(err)
    assert str(path) in message and "\n" not in message, message
    line = BAD_CSVS[name][1]
    if line is not None:
        assert f"line {line}" in message, message
    if name == "dir":
        assert "is a directory" in message, message


@pytest.mark.parametrize("name", sorted(BAD_CSVS))
@pytest.mark.parametrize("reader", [read_metadata, read_locations, read_coordinates])
def test_csv_readers_raise_one_line_errors_naming_file_and_line(tmp_path, name, reader):
    path = _bad_csv(tmp_path, name)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        reader(path)
    _check_message(info.value, path, name)


@pytest.mark.parametrize("name", sorted(BAD_CSVS))
def test_cli_reports_a_bad_csv_in_one_line(tmp_path, capsys, name):
    path = _bad_csv(tmp_path, name)
    good = tmp_path / "good.csv"
    good.write_text("IMG_ID,AUTHOR,LAT,LON\na.jpg,u,1,2\n")
    commands = [
        ["cells", "build", str(path), "-o", str(tmp_path / "cells")],
        ["data", "check-leaks", str(path), str(good)],
        ["data", "check-leaks", str(good), str(path)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith(f"geoswc {argv[0]}: error: ") and "\n" not in err, err
        assert str(path) in err
        if BAD_CSVS[name][1] is not None:
            assert f"line {BAD_CSVS[name][1]}" in err, err
