"""EXIF GPS read by the decode workers from the bytes they decode: `PhotoDataset(exif_gps=True)` and
``geoswc tag``, whose main process no longer opens photos for their position.

The positions are written with `geoswc.tagging.exif_copies.write_gps_exif` at values whose degrees, minutes and hundredths
of seconds are exact, so what the rows must hold is computed by hand.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import geoswc.data.exif
import geoswc.data.photos
import geoswc.tagging.rows
from geoswc.tagging.exif_copies import write_gps_exif
from geoswc.data.exif import read_gps
from geoswc.data.photos import batch_by_shape, group_with_gps, photo_batches, PhotoDataset
from geoswc.tagging.run import ReviewOptions, tag_photos
from geoswc.tagging.output import read_rows

# 48°30'00" N 2°15'36" E and 33°51'25.2" S 151°12'00" E: exact in the EXIF rationals.
GEOTAGS = {"b.jpg": (48.5, 2.26), "d.jpg": (-33.857, 151.2)}
BROKEN = "e.jpg"  # geotagged, image data cut short: unreadable, but its EXIF is intact
BROKEN_GPS = (10.3, -20.5)  # 10°18' N 20°30' W
# The rows publish 7 decimals ("exact") or the precision's decimals, as `geoswc.tagging.run` rounds them.
REGION = {"b.jpg": (48.5, 2.3), "d.jpg": (-33.9, 151.2)}


class MeanColour:
    """Red -> latitude, green -> longitude of the photo's mean colour (a real, tiny predictor)."""

    transform = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])

    def predict_batch(self, pixels):
        return [
            {"lat": (r - 0.5) * 180, "lon": (g - 0.5) * 360, "method": "swc", "cell_token": "89c25"}
            for r, g, _ in pixels.mean(dim=(2, 3)).tolist()
        ]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Five JPEGs (two geotagged, one geotagged and truncated), one text file named .jpg."""
    root = tmp_path_factory.mktemp("archive")
    plain = tmp_path_factory.mktemp("plain")
    rng = np.random.default_rng(0)
    for name in ["a.jpg", "b.jpg", "c.jpg", "d.jpg", BROKEN]:
        pixels = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
        position = GEOTAGS.get(name, BROKEN_GPS if name == BROKEN else None)
        if position is None:
            Image.fromarray(pixels).save(root / name, quality=90)
        else:
            Image.fromarray(pixels).save(plain / name, quality=90)
            write_gps_exif(str(plain / name), str(root / name), *position)
    data = (root / BROKEN).read_bytes()
    (root / BROKEN).write_bytes(data[: len(data) - 600])
    (root / "f.jpg").write_text("not a photo")
    return root


@pytest.fixture
def exif_reads(monkeypatch, tmp_path):
    """Fail every EXIF read of the main process from a path (`read_gps`, Pillow opening a photo file) and
    record the process of every EXIF read from decoded bytes: returns a function listing those process ids
    (and forgetting them)."""
    main_pid = os.getpid()
    calls = tmp_path / "gps-calls"
    calls.write_text("")

    def refuse(path):
        raise AssertionError(f"the main process read EXIF from {path}")

    read_from_bytes = geoswc.data.photos.gps_from_bytes

    def recorded(data):
        with open(calls, "a") as f:  # forked decode workers append here too
            f.write(f"{os.getpid()}\n")
        return read_from_bytes(data)

    pil_open = Image.open

    def open_checked(fp, *args, **kwargs):
        if os.getpid() == main_pid and isinstance(fp, (str, os.PathLike)):
            raise AssertionError(f"the main process opened {fp} with Pillow")
        return pil_open(fp, *args, **kwargs)

    monkeypatch.setattr(geoswc.tagging.rows, "read_gps", refuse)
    monkeypatch.setattr(geoswc.data.exif, "read_gps", refuse)
    monkeypatch.setattr(geoswc.data.photos, "gps_from_bytes", recorded)
    monkeypatch.setattr(Image, "open", open_checked)

    def pids():
        got = [int(line) for line in calls.read_text().split()]
        calls.write_text("")
        return got

    return pids


def by_name(rows):
    return {Path(row["path"]).name: row for row in rows}


@pytest.mark.parametrize("workers", [0, 1])
def test_tag_reads_exif_gps_in_the_workers(archive, tmp_path, workers, exif_reads):
    out = tmp_path / "tags.csv"
    summary = tag_photos([str(archive)], model=MeanColour(), out=str(out), workers=workers, batch_size=2)
    rows = by_name(read_rows(str(out), "csv"))
    assert (summary["ok"], summary["error"]) == (4, 2)
    for name in ["a.jpg", "c.jpg"]:
        assert rows[name]["status"] == "ok" and rows[name]["exif_lat"] is None
    for name, (lat, lon) in GEOTAGS.items():
        assert rows[name]["status"] == "ok"
        assert (rows[name]["exif_lat"], rows[name]["exif_lon"]) == (lat, lon)
        assert rows[name]["exif_distance_km"] is not None
    # A photo that cannot be decoded has an error row and no position, whatever its EXIF holds.
    for name in [BROKEN, "f.jpg"]:
        assert rows[name]["status"] == "error" and rows[name]["exif_lat"] is None
    # Every file's position was read once, from its bytes: in the main process only when it decodes there.
    pids = exif_reads()
    assert len(pids) == 6
    assert (set(pids) == {os.getpid()}) if workers == 0 else (os.getpid() not in pids)

    # --skip-geotagged: decided in the workers too; the truncated photo with a readable position is skipped,
    # as a check of the position before decoding skips it. Positions rounded to the run's precision.
    skipped_out = tmp_path / "skipped.jsonl"
    summary = tag_photos(
        [str(archive)],
        model=MeanColour(),
        out=str(skipped_out),
        workers=workers,
        batch_size=2,
        review=ReviewOptions(skip_geotagged=True),
        precision="region",
    )
    listed = read_rows(str(skipped_out), "jsonl")
    rows = by_name(listed)
    assert (summary["ok"], summary["skipped"], summary["error"]) == (2, 3, 1)
    assert [Path(row["path"]).name for row in listed] == sorted(rows)  # found order kept
    for name, (lat, lon) in {**REGION, BROKEN: (10.3, -20.5)}.items():
        assert rows[name]["status"] == "skipped" and rows[name]["lat"] is None
        assert (rows[name]["exif_lat"], rows[name]["exif_lon"]) == (lat, lon)
    assert rows["f.jpg"]["status"] == "error"
    pids = exif_reads()
    assert len(pids) == 6 and (workers == 0 or os.getpid() not in pids)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_positions_equal_read_gps_of_each_file(archive, workers):
    paths = sorted(str(p) for p in archive.iterdir()) + [str(archive / "missing.jpg")]
    dataset = PhotoDataset(paths, MeanColour.transform, exif_gps=True)
    expected = {i: read_gps(p) for i, p in enumerate(paths) if read_gps(p) is not None}
    assert {Path(paths[i]).name for i in expected} == {*GEOTAGS, BROKEN}
    rows, errors, gps, skipped = [], {}, {}, []
    for batch in photo_batches(dataset, batch_size=2, workers=workers):
        rows.extend(batch.indices.tolist())
        errors.update(batch.errors)
        assert not set(batch.gps) & set(gps), "a position came out twice"
        assert set(batch.gps) <= set(batch.indices.tolist()) | set(batch.errors) | set(batch.skipped)
        gps.update(batch.gps)
        skipped.extend(batch.skipped)
    assert gps == expected and skipped == []
    assert sorted(Path(paths[i]).name for i in errors) == [BROKEN, "f.jpg", "missing.jpg"]
    assert all(isinstance(position, tuple) for position in gps.values())

    # Skipping: geotagged photos are neither decoded nor errors, the rest as without skipping.
    dataset = PhotoDataset(paths, MeanColour.transform, skip_geotagged=True)
    assert dataset.exif_gps
    got = {"rows": [], "errors": {}, "skipped": [], "gps": {}}
    for batch in photo_batches(dataset, batch_size=2, workers=workers):
        got["rows"].extend(batch.indices.tolist())
        got["errors"].update(batch.errors)
        got["skipped"].extend(batch.skipped)
        got["gps"].update(batch.gps)
    assert sorted(got["skipped"]) == sorted(expected) and got["gps"] == expected
    assert sorted(got["rows"]) == sorted(i for i in rows if i not in expected)
    assert sorted(Path(paths[i]).name for i in got["errors"]) == ["f.jpg", "missing.jpg"]


def test_items_keep_three_fields_unless_positions_are_asked_for(archive):
    path = str(archive / "b.jpg")
    index, pixels, error = PhotoDataset([path], MeanColour.transform)[0]
    assert (index, error) == (0, None) and pixels.shape == (3, 16, 16)
    index, with_gps, error, position = PhotoDataset([path], MeanColour.transform, exif_gps=True)[0]
    assert torch.equal(with_gps, pixels) and position == read_gps(path)
    # A PIL image keeps the EXIF of the file it was opened from; an array has none.
    with Image.open(path) as image:
        assert PhotoDataset([image], MeanColour.transform, exif_gps=True)[0][3] == read_gps(path)
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    assert PhotoDataset([array], T.ToTensor(), exif_gps=True)[0][3] is None


def test_batch_by_shape_carries_positions_with_their_photos():
    # Positions arrive as lists after pinned memory; every photo's position leaves with the photo.
    items = [
        (0, torch.zeros(3, 4, 4), None, (1.0, 2.0)),
        (1, torch.zeros(3, 4, 8), None, None),
        (2, None, "empty file", (3.0, 4.0)),
        (3, None, None, (5.0, 6.0)),
        (4, torch.ones(3, 4, 4), None, (7.0, 8.0)),
    ]
    chunks = []
    for k in range(0, len(items), 2):
        stacked, errors, gps, skipped = group_with_gps(items[k : k + 2])
        chunks.append([stacked, errors, {i: list(p) for i, p in gps.items()}, skipped])
    out = list(batch_by_shape(chunks, 2, max_pending=8))
    by_index = {}
    for batch in out:
        for i in [*batch.indices.tolist(), *batch.errors, *batch.skipped]:
            by_index[i] = batch.gps.get(i)
    assert by_index == {0: (1.0, 2.0), 1: None, 2: (3.0, 4.0), 3: (5.0, 6.0), 4: (7.0, 8.0)}
    assert [b.skipped for b in out if b.skipped] == [[3]]
    (shared,) = [b for b in out if len(b) == 2]
    assert shared.indices.tolist() == [0, 4] and shared.gps == {0: (1.0, 2.0), 4: (7.0, 8.0)}
