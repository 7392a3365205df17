"""The machinery of `geoswc tag`: discovery, content sniffing, error rows, outputs, resume, EXIF, precision.

The model here is a small real predictor (`MeanColour`: a photo's mean colour mapped to a position), so the
expected positions are hand-computed from the colours the test photos are painted with.
"""

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import piexif
import pytest
from PIL import Image
from torchvision import transforms as T

from geoswc.tagging.exif_copies import dms_to_degrees, round_latlon
from geoswc.data.images import discover, load_photo, PhotoError, sniff
from geoswc.tagging.run import resize_target, tag_photos
from geoswc.tagging.output import COLUMNS, make_row, read_appendable, read_rows, RowWriter


class MeanColour:
    """Red -> latitude, green -> longitude, blue -> cell probability, of the photo's mean colour."""

    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])

    def predict_batch(self, pixels):
        assert pixels.ndim == 4 and pixels.shape[1:] == (3, 32, 32)
        means = pixels.mean(dim=(2, 3)).tolist()
        return [
            {
                "lat": (r - 0.5) * 180,
                "lon": (g - 0.5) * 360,
                "method": "swc",
                "cell_token": "89c25",
                "cell_probability": b,
                "confidence": 0.5,
            }
            for r, g, b in means
        ]


def expected_latlon(rgb):
    r, g, _ = rgb
    return (r / 255 - 0.5) * 180, (g / 255 - 0.5) * 360


def save(path, rgb=(51, 102, 153), fmt=None, size=(48, 40), **kwargs):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format=fmt, **kwargs)
    return path


def encoded(fmt, **kwargs):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def bomb_png(path, width=20_000, height=10_000):
    """A tiny PNG whose header announces width x height pixels (200 M > Pillow's 179 M limit)."""
    data = bytearray(encoded("PNG"))
    ihdr = bytearray(data[12:29])  # b'IHDR' + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    Path(path).write_bytes(bytes(data))
    return path


def sha256_tree(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def by_path(rows):
    return {row["path"]: row for row in rows}


# --------------------------------------------------------------------------------------------- discovery


def test_sniff_names_formats_by_content():
    assert sniff(encoded("JPEG")) == "JPEG"
    assert sniff(encoded("PNG")) == "PNG"
    assert sniff(encoded("WEBP")) == "WEBP"
    assert sniff(encoded("BMP")) == "BMP"
    assert sniff(encoded("TIFF")) == "TIFF"
    assert sniff(encoded("GIF")) == "GIF"
    assert sniff(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "HEIF"
    assert sniff(b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00") is None  # an MP4 video
    assert sniff(b"%PDF-1.7\n") is None
    assert sniff(b"") is None


def test_discover_walks_folders_by_content_and_skips_hidden_and_non_photos(tmp_path):
    root = tmp_path / "archive"
    save(root / "b.jpg")
    save(root / "a" / "x.png", fmt="PNG")
    save(root / "a" / "scan_0001", fmt="JPEG")  # no extension: recognised by content
    save(root / ".thumbs" / "t.jpg")  # hidden folder
    save(root / ".hidden.jpg")  # hidden file
    (root / "notes.txt").write_text("not a photo")
    (root / "empty.jpg").write_bytes(b"")  # photo name, damaged content: kept to get an error row
    os.symlink("..", root / "a" / "loop")  # a cycle back to the root
    found = discover([str(root)])
    rels = [p.rel for p in found.photos]
    assert rels == ["a/scan_0001", "a/x.png", "b.jpg", "empty.jpg"]
    assert found.skipped_not_photo == 1
    assert found.skipped_hidden == 2
    assert not any(p.explicit for p in found.photos)


def test_discover_explicit_files_globs_and_lists(tmp_path):
    save(tmp_path / "d1" / "p.jpg")
    save(tmp_path / "d2" / "q.jpg")
    save(tmp_path / "d2" / "r.png", fmt="PNG")
    (tmp_path / "d2" / "notes.txt").write_text("x")
    (tmp_path / "list.txt").write_text("# photos to tag\nd1/p.jpg\n\nd2/notes.txt\nd1/gone.jpg\n")
    found = discover(
        [f"@{tmp_path / 'list.txt'}", str(tmp_path / "d2" / "*"), str(tmp_path / "d1" / "p.jpg")]
    )
    paths = [p.path for p in found.photos]
    assert paths == [
        str(tmp_path / "d1" / "p.jpg"),  # from the list; named again later but kept once
        str(tmp_path / "d2" / "notes.txt"),  # listed explicitly: kept, to get an error row
        str(tmp_path / "d1" / "gone.jpg"),  # listed but missing: kept, to get an error row
        str(tmp_path / "d2" / "q.jpg"),
        str(tmp_path / "d2" / "r.png"),
    ]
    assert found.skipped_not_photo == 1  # notes.txt matched by the glob
    assert [p.rel for p in found.photos][0] == os.path.join("d1", "p.jpg")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        discover([str(tmp_path / "nothing-here")])


# --------------------------------------------------------------------------------------------- decoding


def test_load_photo_reasons(tmp_path):
    good = save(tmp_path / "good.jpg", size=(800, 600))
    assert load_photo(str(good)).size == (800, 600)
    # Reduced-size decoding: libjpeg's 1/4 scale keeps both sides >= 150.
    assert load_photo(str(good), target=150).size == (200, 150)
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    assert load_photo(str(gif)).getpixel((5, 5)) == (255, 0, 0)  # first frame

    cases = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (good.read_bytes()[:600], "JPEG: unreadable image"),
        "corrupt.png": (encoded("PNG")[:20] + b"\x00" * 200, "PNG: unreadable image"),
        "text.jpg": (b"hello world, not a photo", "not a recognised image"),
        "phone.heic": (
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
            "pip install pillow-heif",
        ),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PhotoError, match=reason):
            load_photo(str(tmp_path / name))
    with pytest.raises(PhotoError, match="decompression bomb"):
        load_photo(str(bomb_png(tmp_path / "bomb.png")))
    with pytest.raises(PhotoError, match="file not found"):
        load_photo(str(tmp_path / "missing.jpg"))


@pytest.mark.slow
def test_unreadable_file_is_an_error_row(tmp_path):
    """Permissions are checked as an unprivileged user (root reads everything)."""
    folder = Path(tempfile.mkdtemp(prefix="geoswc-perm-"))
    try:
        folder.chmod(0o755)
        save(folder / "locked.jpg").chmod(0o000)
        save(folder / "open.jpg").chmod(0o644)
        script = (
            "import os, sys\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import torch.utils.data, PIL.Image\n"
            "from test_tag import MeanColour\n"
            "from geoswc.tagging.run import tag_photos\n"
            "PIL.Image.init()\n"
            # The gazetteer loads scipy on first use, in the middle of the run: load it now.
            "from geoswc.data import places\n"
            "places.gazetteer()\n"
            # Drop privileges once the interpreter's own files are loaded (they live under root's home).
            "if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)\n"
            f"s = tag_photos([{str(folder)!r}], model=MeanColour(), out='/dev/stdout', workers=0)\n"
        )
        # '/dev/stdout' has no known extension; write to a file the unprivileged user may create instead.
        out = folder / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        script = script.replace("'/dev/stdout'", repr(str(out / "rows.jsonl")))
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
        rows = by_path(read_rows(str(out / "rows.jsonl"), "jsonl"))
        assert rows[str(folder / "locked.jpg")]["status"] == "error"
        assert rows[str(folder / "locked.jpg")]["error"] == "unreadable: permission denied"
        assert rows[str(folder / "open.jpg")]["status"] == "ok"
    finally:
        for path in folder.rglob("*"):
            path.chmod(0o777)
        subprocess.run(["rm", "-rf", str(folder)], check=True)


# --------------------------------------------------------------------------------------------- tagging


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    colours = {}
    for i in range(7):
        rgb = (30 * i, 255 - 30 * i, 100)
        # PNG is lossless, so the mean colour (and the position) is exact.
        path = save(root / f"trip{i % 2}" / f"img{i}.png", rgb=rgb, fmt="PNG")
        colours[str(path)] = rgb
    save(root / "trip0" / "cam.jpg", rgb=(200, 100, 50), quality=95)
    (root / "trip1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    bomb_png(root / "bomb.png")
    (root / "trip1" / "readme.md").write_text("# trip notes")
    return root, colours


def test_every_photo_gets_one_row_with_the_predictors_position(archive, tmp_path):
    root, colours = archive
    before = sha256_tree(root)
    out = tmp_path / "tags.csv"
    summary = tag_photos([str(root)], model=MeanColour(), out=str(out), batch_size=3, workers=2, target=32)
    rows = read_rows(str(out), "csv")
    assert len(rows) == len({r["path"] for r in rows}) == 10
    assert (summary["ok"], summary["error"], summary["skipped_not_photo"]) == (8, 2, 1)
    found = by_path(rows)
    for path, rgb in colours.items():
        lat, lon = expected_latlon(rgb)
        assert found[path]["status"] == "ok"
        assert found[path]["lat"] == pytest.approx(lat, abs=1e-4)
        assert found[path]["lon"] == pytest.approx(lon, abs=1e-4)
        assert found[path]["cell_probability"] == pytest.approx(100 / 255, abs=1e-6)
        assert (found[path]["method"], found[path]["cell_token"], found[path]["confidence"]) == (
            "swc",
            "89c25",
            0.5,
        )
    assert found[str(root / "trip1" / "broken.jpg")]["error"].startswith("JPEG: unreadable image")
    assert "decompression bomb" in found[str(root / "bomb.png")]["error"]
    assert sha256_tree(root) == before  # originals untouched


def test_outputs_hold_the_same_rows_in_every_format(archive, tmp_path):
    root, _ = archive
    tables = {}
    for ext in ("csv", "jsonl", "geojson", "parquet"):
        out = tmp_path / f"tags.{ext}"
        tag_photos([str(root)], model=MeanColour(), out=str(out), batch_size=4, workers=0)
        tables[ext] = read_rows(str(out), ext)
        assert not list(tmp_path.glob(f"tags.{ext}.journal-*"))  # journals are merged away
    reference = tables["jsonl"]
    for ext, rows in tables.items():
        assert [r["path"] for r in rows] == [r["path"] for r in reference], ext
        for row, ref in zip(rows, reference):
            for key in COLUMNS:
                if isinstance(ref[key], float):
                    assert row[key] == pytest.approx(ref[key], rel=1e-12), (ext, key)
                else:
                    assert (row[key] or None) == (ref[key] or None), (ext, key)
    collection = json.loads((tmp_path / "tags.geojson").read_text())
    point = next(f for f in collection["features"] if f["properties"]["status"] == "ok")
    assert point["geometry"]["coordinates"] == [point["properties"]["lon"], point["properties"]["lat"]]
    assert any(f["geometry"] is None for f in collection["features"])  # error rows


def test_existing_output_needs_resume_or_overwrite(archive, tmp_path):
    root, _ = archive
    out = tmp_path / "tags.jsonl"
    tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0)
    first = out.read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0)
    assert out.read_bytes() == first  # nothing lost
    summary = tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, resume=True)
    assert (summary["tagged"], summary["resumed"]) == (0, 10)
    assert out.read_bytes() == first
    tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, overwrite=True)
    assert out.read_bytes() == first
    with pytest.raises(ValueError, match="choose one of: .csv, .jsonl, .geojson, .parquet"):
        tag_photos([str(root)], model=MeanColour(), out=str(tmp_path / "tags.xlsx"))
    with pytest.raises(ValueError, match="precision 'street'"):
        tag_photos([str(root)], model=MeanColour(), out=str(tmp_path / "t.csv"), precision="street")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_cuts_a_partial_row_and_completes(tmp_path, fmt):
    root = tmp_path / "in"
    for i in range(6):
        save(root / f"p{i}.png", rgb=(40 * i, 10, 10), fmt="PNG")
    # A file name with a newline and a quote: a CSV row spanning two lines must not be mistaken for a cut.
    save(root / 'p2b\nodd "x".png', rgb=(250, 250, 250), fmt="PNG")
    reference = tmp_path / f"ref.{fmt}"
    tag_photos([str(root)], model=MeanColour(), out=str(reference), workers=0, batch_size=2)
    assert len(read_rows(str(reference), fmt)) == 7
    # A run killed after 3 rows, part-way through writing the 4th (the odd name's row), just past its newline.
    out = tmp_path / f"tags.{fmt}"
    with RowWriter(str(out), fmt) as writer:
        writer.write(read_appendable(str(reference), fmt, repair=False)[:3])
    data = reference.read_bytes()
    done = out.read_bytes()
    assert data.startswith(done)
    name = b"p2b\nodd" if fmt == "csv" else b"p2b\\nodd"
    out.write_bytes(data[: data.index(name, len(done)) + len(name)])
    summary = tag_photos([str(root)], model=MeanColour(), out=str(out), workers=0, resume=True, batch_size=2)
    assert (summary["resumed"], summary["tagged"], summary["ok"]) == (3, 4, 7)
    assert out.read_bytes() == reference.read_bytes()


def test_precision_rounding_and_exif_copies(tmp_path):
    root = tmp_path / "in"
    # (r, g) -> lat = (r/255 - .5) * 180, lon = (g/255 - .5) * 360: south-west and north-east positions.
    save(root / "sw" / "a.jpg", rgb=(20, 30, 128), quality=100)
    save(root / "ne" / "b.jpg", rgb=(230, 220, 128), quality=100)
    save(root / "c.png", rgb=(128, 128, 128), fmt="PNG")
    before = sha256_tree(root)

    assert round_latlon(48.858370, 2.294481, "city") == (48.86, 2.29)
    assert round_latlon(48.858370, 2.294481, "region") == (48.9, 2.3)
    assert round_latlon(-0.4, -0.3, "country") == (0.0, 0.0)
    assert str(round_latlon(-0.4, -0.3, "country")[0]) == "0.0"  # no "-0.0"
    assert round_latlon(48.858370, 2.294481, "exact") == (48.858370, 2.294481)

    exact = tag_photos([str(root)], model=MeanColour(), out=str(tmp_path / "e.csv"), workers=0)
    exact = by_path(read_rows(exact["output"], "csv"))
    out = tmp_path / "tags.csv"
    tag_photos(
        [str(root)],
        model=MeanColour(),
        out=str(out),
        workers=0,
        precision="city",
        write_exif=str(tmp_path / "exif"),
    )
    rows = by_path(read_rows(str(out), "csv"))
    for path, row in rows.items():
        assert (row["lat"], row["lon"]) == round_latlon(exact[path]["lat"], exact[path]["lon"], "city")
    assert sha256_tree(root) == before
    copies = sorted(p.relative_to(tmp_path / "exif") for p in (tmp_path / "exif").rglob("*") if p.is_file())
    assert copies == [Path("ne/b.jpg"), Path("sw/a.jpg")]  # JPEGs only, same layout
    for rel in ("ne/b.jpg", "sw/a.jpg"):
        row = rows[str(root / rel)]
        gps = piexif.load(str(tmp_path / "exif" / rel))["GPS"]
        lat = dms_to_degrees(gps[piexif.GPSIFD.GPSLatitude], gps[piexif.GPSIFD.GPSLatitudeRef].decode())
        lon = dms_to_degrees(gps[piexif.GPSIFD.GPSLongitude], gps[piexif.GPSIFD.GPSLongitudeRef].decode())
        assert (round(lat, 6), round(lon, 6)) == (row["lat"], row["lon"])
        # Same pixels as the original: only the EXIF segment changed.
        with Image.open(root / rel) as original, Image.open(tmp_path / "exif" / rel) as copy:
            assert original.tobytes() == copy.tobytes()
    sw = piexif.load(str(tmp_path / "exif" / "sw" / "a.jpg"))["GPS"]
    assert (sw[piexif.GPSIFD.GPSLatitudeRef], sw[piexif.GPSIFD.GPSLongitudeRef]) == (b"S", b"W")
    with pytest.raises(ValueError, match="replace the originals"):
        tag_photos([str(root)], model=MeanColour(), out=str(tmp_path / "x.csv"), write_exif=str(root))


def test_dms_rationals_hand_computed(tmp_path):
    from geoswc.tagging.exif_copies import gps_ifd

    gps = gps_ifd(-33.8568, 151.2153)  # Sydney Opera House
    assert gps[piexif.GPSIFD.GPSLatitudeRef] == b"S"
    # 33.8568 deg = 33 deg 51' 24.48"; 151.2153 deg = 151 deg 12' 55.08"
    assert gps[piexif.GPSIFD.GPSLatitude] == ((33, 1), (51, 1), (2448, 100))
    assert gps[piexif.GPSIFD.GPSLongitude] == ((151, 1), (12, 1), (5508, 100))
    assert gps_ifd(10.0, 20.0, precision="country")[piexif.GPSIFD.GPSLatitude] == ((10, 1), (0, 1), (0, 100))


def test_make_row_keeps_error_rows_on_one_line():
    row = make_row("a.jpg", error="broken\nin two")
    assert (row["status"], row["error"], row["lat"]) == ("error", "broken in two", None)
    # The Geolocator's records name the probability `cell_prob`.
    row = make_row(
        "b.jpg", prediction={"lat": 1, "lon": 2, "method": "swc", "cell_token": "47", "cell_prob": 0.25}
    )
    assert (row["status"], row["lat"], row["cell_probability"], row["confidence"]) == ("ok", 1.0, 0.25, None)


def test_resize_target_reads_the_eval_transform():
    assert resize_target(MeanColour.transform) == 32
    assert resize_target(T.Compose([T.Resize((300, 400)), T.ToTensor()])) == 300
    assert resize_target(T.ToTensor()) is None
    from geoswc.data.transforms import build_transform

    ours = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert resize_target(build_transform(ours, train=False, size=300, eval_resize="longest")) == 300
