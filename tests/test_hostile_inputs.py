"""Inputs that try to hang, exhaust or fool geoswc: special files among photos, decompression-sized images
under the bomb limit, and model folders whose files were altered, misplaced or swapped.

Every test that could hang on a regression runs the work under a timeout (a thread, or a subprocess with a
memory cap), so a regression fails instead of blocking the suite.
"""

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoswc.data import images
from geoswc.data.images import PhotoError, decode_array, discover, load_photo, read_photo_bytes

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
needs_dev_zero = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")


# ----------------------------------------------------------------------------------------- special files
def _release(fifos):
    """Unblock a reader stuck in open() on a FIFO: open the write end (the reader's open returns), close it
    (the reader gets end of file)."""
    for fifo in fifos:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader waiting
            continue
        os.close(fd)


def call_with_timeout(fn, *, timeout=15.0, fifos=()):
    """``fn()`` in a thread; fails the test (after unblocking the thread) when it does not finish in time."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # handed to the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            _release(fifos)
            thread.join(0.05)
        pytest.fail(f"still blocked after {timeout:g} s: a FIFO or device was opened for reading")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _jpeg(path, size=(40, 30), colour=(200, 60, 30)):
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


@pytest.fixture
def archive(tmp_path):
    """A folder with one photo and FIFOs with and without a photo extension."""
    root = tmp_path / "archive"
    root.mkdir()
    _jpeg(root / "good.jpg")
    fifos = [root / "pipe.jpg", root / "pipe"]
    if hasattr(os, "mkfifo"):
        for fifo in fifos:
            os.mkfifo(fifo)
    yield root, fifos
    _release(fifos)


@needs_fifo
def test_fifos_in_a_folder_walk_are_skipped_as_not_photos(archive):
    root, fifos = archive
    found = call_with_timeout(lambda: discover([str(root)]), fifos=fifos)
    assert [Path(p.path).name for p in found.photos] == ["good.jpg"]
    assert found.skipped_not_photo == 2


@needs_fifo
@pytest.mark.parametrize("pattern", ["*", "*.jpg", "**/*"])
def test_fifos_matched_by_a_glob_are_skipped_without_being_opened(archive, pattern):
    root, fifos = archive
    found = call_with_timeout(lambda: discover([str(root / pattern)]), fifos=fifos)
    assert [Path(p.path).name for p in found.photos] == ["good.jpg"]
    assert found.skipped_not_photo == (1 if pattern == "*.jpg" else 2)


@needs_fifo
def test_an_explicitly_named_fifo_is_a_photo_error(archive):
    root, fifos = archive
    for fifo in fifos:
        found = call_with_timeout(lambda: discover([str(fifo)]), fifos=fifos)
        assert [(p.path, p.explicit) for p in found.photos] == [(str(fifo), True)]
        for read in (read_photo_bytes, load_photo, lambda p: load_photo(p, target=32, as_array=True)):
            with pytest.raises(PhotoError, match="not a regular file"):
                call_with_timeout(lambda: read(str(fifo)), fifos=fifos)
        # The decoder's own path reader refuses it too.
        with pytest.raises(images.ImageDecodeError, match="not a regular file"):
            call_with_timeout(lambda: decode_array(str(fifo)), fifos=fifos)


@needs_fifo
def test_tag_writes_an_error_row_for_a_fifo(archive, tiny_model_dir, tmp_path):
    from geoswc.tagging.run import tag_photos
    from geoswc.tagging.output import read_rows

    root, fifos = archive
    out = tmp_path / "tags.csv"
    summary = call_with_timeout(
        lambda: tag_photos([str(root / "*.jpg"), str(fifos[1])], model=tiny_model_dir, out=out, workers=0),
        timeout=120,
        fifos=fifos,
    )
    rows = {Path(r["path"]).name: r for r in read_rows(str(out), "csv")}
    assert set(rows) == {"good.jpg", "pipe"}
    assert rows["good.jpg"]["status"] == "ok"
    assert rows["pipe"]["status"] == "error" and "not a regular file" in rows["pipe"]["error"]
    assert summary["ok"] == 1 and summary["error"] == 1 and summary["skipped_not_photo"] == 1


def _child(script, *, timeout=60):
    """Run ``script`` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The child caps its own address space a little above what its imports use, so a reader that never stops
# (/dev/zero) fails fast with MemoryError instead of filling the machine.
_CAPPED = """
    import json, resource, sys
    from geoswc.data.images import PhotoError, discover, load_photo
    vm_kb = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0])
    limit = vm_kb * 1024 + (256 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
"""


@needs_dev_zero
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_device_behind_a_photo_name_is_never_read(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    _jpeg(root / "good.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "zero").symlink_to("/dev/zero")
    script = (
        _CAPPED
        + f"""
    root = {str(root)!r}
    out = {{"walk": [p.path for p in discover([root]).photos]}}
    found = discover([root + "/*"])
    out["glob"] = [p.path for p in found.photos]
    out["glob_skipped"] = found.skipped_not_photo
    try:
        load_photo(root + "/zero.jpg", target=32)
        out["explicit"] = "decoded"
    except PhotoError as err:
        out["explicit"] = str(err)
    except MemoryError:
        out["explicit"] = "MemoryError: read without end"
    print(json.dumps(out))
    """
    )
    out = _child(script)
    good = str(root / "good.jpg")
    assert out["walk"] == [good] and out["glob"] == [good] and out["glob_skipped"] == 2
    assert "not a regular file" in out["explicit"]


# ------------------------------------------------------------------------------------ decoded size bound
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_blank_png(path, width, height, *, colour_type=0):
    """A PNG of zeros (8-bit grey, or RGB with ``colour_type=2``) compressed row by row: a few hundred KB on
    disk however many pixels it declares."""
    channels = {0: 1, 2: 3}[colour_type]
    compressor = zlib.compressobj(9)
    rows = (b"\x00" * (1 + channels * width)) * 64
    parts = []
    for start in range(0, height, 64):
        parts.append(compressor.compress(rows[: (1 + channels * width) * min(64, height - start)]))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
    return Path(path)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """13,000 x 13,000 pixels (under the bomb limit MAX_IMAGE_PIXELS), about 170 KB on disk."""
    return write_blank_png(tmp_path_factory.mktemp("huge") / "huge.png", 13_000, 13_000)


def test_the_huge_png_is_small_on_disk_and_under_the_bomb_limit(huge_png):
    assert huge_png.stat().st_size < 1 << 20
    assert 13_000 * 13_000 < images.MAX_IMAGE_PIXELS


@pytest.mark.skipif(sys.platform == "win32", reason="ru_maxrss is POSIX")
def test_decoding_a_huge_png_for_a_small_target_keeps_peak_memory_bounded(huge_png):
    # tracemalloc cannot see Pillow's C allocations: the child's peak resident size says what was used.
    script = f"""
    import json, resource
    import numpy as np
    from geoswc.data.images import PhotoError, load_photo
    from geoswc.data.photos import PhotoDataset
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    errors = []
    try:
        load_photo({str(huge_png)!r}, target=64, as_array=True)
    except PhotoError as err:
        errors.append(str(err))
    item = PhotoDataset([{str(huge_png)!r}], lambda a: a, target=64)[0]
    errors.append(item[2])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"grown_mb": (after - before) / 1024, "errors": errors}}))
    """
    out = _child(script, timeout=120)
    # 13,000 x 13,000 RGB is 507 MB decoded (and more on the way); the bound is a tenth of that.
    assert out["grown_mb"] < 50, out
    for error in out["errors"]:
        assert error and "13000x13000" in error and "MAX_TARGET_PIXELS" in error, out


def test_the_target_pixel_limit_applies_to_formats_decoded_at_full_size(tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, size=(400, 300, 3), dtype=np.uint8)
    png, jpg = tmp_path / "p.png", tmp_path / "p.jpg"
    Image.fromarray(pixels).save(png)
    Image.fromarray(pixels).save(jpg, quality=95)
    # Without a target the full image is what the caller asked for: only the bomb limit applies.
    assert decode_array(str(png)).shape == (400, 300, 3)
    assert decode_array(str(png), target=32, max_target_pixels=400 * 300).shape == (400, 300, 3)
    with pytest.raises(images.ImageDecodeError, match="300x400.*max_target_pixels|MAX_TARGET_PIXELS"):
        decode_array(str(png), target=32, max_target_pixels=400 * 300 - 1)
    with pytest.raises(PhotoError, match="PNG: .*300x400"):
        load_photo(str(png), target=32, max_target_pixels=10_000)
    # A JPEG decodes at 1/8 scale for this target: 38 x 50 pixels, well under the same limit.
    assert decode_array(str(jpg), target=32, max_target_pixels=10_000).shape == (50, 38, 3)
    # ... but not when the reduced size is still above it.
    with pytest.raises(images.ImageDecodeError, match="38x50"):
        decode_array(str(jpg), target=32, max_target_pixels=1_000)
    # The module constant is the default, read at call time.
    monkeypatch.setattr(images, "MAX_TARGET_PIXELS", 10_000)
    with pytest.raises(PhotoError, match="MAX_TARGET_PIXELS"):
        load_photo(str(png), target=32)
    assert load_photo(str(png)).size == (300, 400)
    with pytest.raises(ValueError, match="max_target_pixels"):
        decode_array(str(png), target=32, max_target_pixels=0)


def test_photo_dataset_passes_the_target_pixel_limit(tmp_path):
    from geoswc.data.photos import PhotoDataset

    path = tmp_path / "p.png"
    Image.new("RGB", (120, 100), (1, 2, 3)).save(path)
    strict = PhotoDataset([path], lambda a: a, target=16, max_target_pixels=1_000)
    assert "120x100" in strict[0][2]
    assert PhotoDataset([path], lambda a: a, target=16)[0][2] is None


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "LA"])
def test_wide_and_transparent_modes_convert_as_before(tmp_path, mode):
    # The conversions now work in blocks; the values must be those of the whole-array formula.
    rng = np.random.default_rng(1)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(37, 23), dtype=np.uint16))
        assert image.mode == "I;16"
        top = 65535.0
    elif mode in ("I", "F"):
        values = rng.integers(0, 100_000, size=(37, 23)).astype(np.int32 if mode == "I" else np.float32)
        image = Image.fromarray(values)
        assert image.mode == mode
        top = float(values.max())
    else:
        image = Image.fromarray(rng.integers(0, 256, size=(37, 23, 4), dtype=np.uint8), "RGBA").convert(mode)
    got = np.asarray(images._to_rgb(image))
    if mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        expected = np.asarray(canvas)
    else:
        grey = np.clip(np.asarray(image, dtype=np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        expected = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------------------- model folders
@pytest.fixture
def folder(tiny_model_dir, tmp_path):
    """A private copy of the tiny model folder, free to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _read_json(path):
    return json.loads(Path(path).read_text())


def _write_json(path, value):
    Path(path).write_text(json.dumps(value, indent=2) + "\n")


def drop_checksums(folder):
    """Make ``folder`` look like one saved before checksums existed (the structural checks must hold alone)."""
    meta = _read_json(folder / "geolocator.json")
    meta.pop("sha256", None)
    _write_json(folder / "geolocator.json", meta)


def _load(folder):
    from geoswc.geolocator import Geolocator

    return Geolocator.from_pretrained(folder, device="cpu")


def test_save_pretrained_records_a_sha256_of_every_part(tiny_model_dir):
    meta = _read_json(tiny_model_dir / "geolocator.json")
    record = meta["sha256"]
    expected = {
        "config.yaml",
        "backbone.safetensors",
        "backbone.json",
        "heads/ce.safetensors",
        "heads/hc.safetensors",
        "heads/mvmf.safetensors",
        "retrieval.safetensors",
        "cells/geocells.json",
        "cells/hierarchy.csv",
        *(
            f"cells/{entry['file']}"
            for entry in _read_json(tiny_model_dir / "cells/geocells.json")["partitions"]
        ),
        *(
            f"index/{name}"
            for name in (
                "index.json",
                "embeddings.npy",
                "offsets.npy",
                "cell_idx.npy",
                "latlon.npy",
                "ids.txt",
            )
        ),
    }
    assert set(record) == expected
    for rel, digest in record.items():
        assert digest == hashlib.sha256((tiny_model_dir / rel).read_bytes()).hexdigest(), rel


def test_a_swapped_retrieval_module_with_the_same_fingerprint_is_refused(folder):
    from geoswc.retrieval.model import ResidualRetrievalModule, read_metadata

    meta = read_metadata(folder / "retrieval.safetensors")
    other = ResidualRetrievalModule(int(meta["dim"]), int(meta["hidden_dim"]))
    other.save(folder / "retrieval.safetensors", fingerprint=meta["fingerprint"])
    with pytest.raises(ValueError, match=r"retrieval\.safetensors.*SHA-256"):
        _load(folder)


@pytest.mark.parametrize("part", ["backbone.safetensors", "heads/hc.safetensors", "cells/hierarchy.csv"])
def test_any_changed_part_is_refused(folder, part):
    path = folder / part
    data = bytearray(path.read_bytes())
    if part.endswith(".safetensors"):
        data[-1] ^= 0x01  # one bit of the last tensor: the file still parses
    else:
        data += b"\n"  # a blank line pandas ignores
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=part.replace(".", r"\.") + ".*SHA-256"):
        _load(folder)


def test_a_part_not_recorded_is_refused(folder):
    meta = _read_json(folder / "geolocator.json")
    del meta["sha256"]["retrieval.safetensors"]
    _write_json(folder / "geolocator.json", meta)
    with pytest.raises(ValueError, match=r"retrieval\.safetensors.*not recorded"):
        _load(folder)


def test_a_head_file_not_listed_is_refused(folder):
    shutil.copy(folder / "heads" / "ce.safetensors", folder / "heads" / "extra.safetensors")
    drop_checksums(folder)
    with pytest.raises(ValueError, match=r"extra\.safetensors.*not listed"):
        _load(folder)


def test_a_checksum_path_outside_the_folder_is_refused(folder, tmp_path):
    (tmp_path / "outside.txt").write_text("TOP SECRET\n")
    meta = _read_json(folder / "geolocator.json")
    meta["sha256"]["../outside.txt"] = "0" * 64
    _write_json(folder / "geolocator.json", meta)
    with pytest.raises(ValueError, match=r"geolocator\.json.*\.\./outside\.txt"):
        _load(folder)


def test_a_folder_without_checksums_loads_with_a_warning(folder, caplog):
    drop_checksums(folder)
    with caplog.at_level(logging.WARNING, logger="geoswc.geolocator"):
        model = _load(folder)
    assert model.head_names == ["ce", "hc", "mvmf"]
    assert any("checksum" in r.getMessage() and str(folder) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["../../secret.csv", "ABSOLUTE"])
def test_cells_files_outside_the_folder_are_refused_unread(folder, tmp_path, where):
    from geoswc.geocells import Geocells

    secret = tmp_path / "secret.csv"
    secret.write_text("TOP SECRET LINE\nSECOND SECRET LINE\n")
    name = str(secret) if where == "ABSOLUTE" else where
    meta = _read_json(folder / "cells" / "geocells.json")
    meta["partitions"][0]["file"] = name
    _write_json(folder / "cells" / "geocells.json", meta)
    drop_checksums(folder)
    for load in (lambda: Geocells.load(folder / "cells"), lambda: _load(folder)):
        with pytest.raises(ValueError, match=r"geocells\.json") as err:
            load()
        assert "SECRET" not in str(err.value) and "outside" in str(err.value)
    meta["partitions"][0]["file"] = "cells_x.csv"
    meta["hierarchy"]["file"] = "../" + Path(folder).name + "/cells/hierarchy.csv"
    _write_json(folder / "cells" / "geocells.json", meta)
    with pytest.raises(ValueError, match=r"geocells\.json.*hierarchy"):
        Geocells.load(folder / "cells")


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_a_cells_file_linking_outside_the_folder_is_refused_unread(folder, tmp_path):
    from geoswc.geocells import Geocells

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET LINE\nSECOND SECRET LINE\n")
    entry = _read_json(folder / "cells" / "geocells.json")["partitions"][0]
    (folder / "cells" / entry["file"]).unlink()
    (folder / "cells" / entry["file"]).symlink_to(secret)
    with pytest.raises(ValueError, match=r"geocells\.json.*link.*outside") as err:
        Geocells.load(folder / "cells")
    assert "SECRET" not in str(err.value)


def test_a_malformed_geocells_json_names_the_file(folder):
    from geoswc.geocells import Geocells

    path = folder / "cells" / "geocells.json"
    for text in ("{not json", "[]", json.dumps({"partitions": [{"name": "a"}], "fingerprint": "x"})):
        path.write_text(text)
        with pytest.raises(ValueError, match=r"geocells\.json"):
            Geocells.load(folder / "cells")


@pytest.mark.parametrize(
    "column, value", [("latitude_mean", 123.0), ("longitude_mean", -181.0), ("latitude_mean", np.inf)]
)
def test_cell_centres_outside_the_valid_range_are_refused(folder, column, value):
    from geoswc.geocells import Geocells

    entry = _read_json(folder / "cells" / "geocells.json")["partitions"][-1]
    path = folder / "cells" / entry["file"]
    preamble = path.read_text().splitlines()[:2]
    table = pd.read_csv(path, skiprows=2, dtype={"hex_id": str})
    table.loc[3, column] = value
    with open(path, "w") as f:
        f.write("\n".join(preamble) + "\n")
        table.to_csv(f, index=False, lineterminator="\n")
    drop_checksums(folder)
    for load in (lambda: Geocells.load(folder / "cells"), lambda: _load(folder)):
        with pytest.raises(ValueError, match=rf"{entry['file']}.*row 4.*{column}"):
            load()


def _index_array(folder, name):
    return np.load(folder / "index" / name)


def _damage_index(folder, name, array):
    np.save(folder / "index" / name, array)
    drop_checksums(folder)


def _first_populated(offsets):
    """The first cell holding a background photo that is not the last cell."""
    return int(np.flatnonzero(np.diff(offsets)[:-1] > 0)[0])


def _swap_around_populated(o):
    c = _first_populated(o)
    o = o.copy()
    o[c], o[c + 1] = o[c + 1], o[c]
    return o


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda o: o[::-1].copy(), r"offsets\.npy.*start at 0"),
        (_swap_around_populated, r"offsets\.npy.*non-decreasing"),
        (lambda o: np.append(o[:-1], o[-1] - 1), r"offsets\.npy.*end at"),
        (lambda o: o[:-1], r"offsets\.npy.*entries"),
        (lambda o: o.astype(np.float64), r"offsets\.npy.*integer"),
    ],
)
def test_scrambled_index_offsets_are_refused(folder, damage, match):
    from geoswc.retrieval.index import BackgroundIndex

    _damage_index(folder, "offsets.npy", damage(_index_array(folder, "offsets.npy")))
    for load in (lambda: BackgroundIndex.load(folder / "index"), lambda: _load(folder)):
        with pytest.raises(ValueError, match=match):
            load()


def test_offsets_that_disagree_with_the_rows_cells_are_refused(folder):
    from geoswc.retrieval.index import BackgroundIndex

    offsets = _index_array(folder, "offsets.npy")
    # The last row of a populated cell moves to the next cell: monotonic, same end, wrong cells.
    shifted = offsets.copy()
    shifted[_first_populated(offsets) + 1] -= 1
    assert np.all(np.diff(shifted) >= 0) and shifted[-1] == offsets[-1]
    _damage_index(folder, "offsets.npy", shifted)
    with pytest.raises(ValueError, match=r"cell_idx\.npy.*offsets"):
        BackgroundIndex.load(folder / "index")


@pytest.mark.parametrize(
    "name, damage, match",
    [
        ("latlon.npy", lambda a: a[:-1], r"latlon\.npy.*shape"),
        ("latlon.npy", lambda a: np.where(np.arange(len(a))[:, None] == 2, 95.0, a), r"latlon\.npy.*row 2"),
        ("latlon.npy", lambda a: np.where(np.arange(len(a))[:, None] == 5, np.nan, a), r"latlon\.npy.*row 5"),
        ("cell_idx.npy", lambda a: a[:-1], r"cell_idx\.npy"),
        ("embeddings.npy", lambda a: a[:, :-1], r"embeddings\.npy.*dim"),
        ("embeddings.npy", lambda a: a.astype(np.float32), r"embeddings\.npy.*float16"),
    ],
)
def test_index_files_that_disagree_are_refused(folder, name, damage, match):
    from geoswc.retrieval.index import BackgroundIndex

    _damage_index(folder, name, damage(_index_array(folder, name)))
    for load in (lambda: BackgroundIndex.load(folder / "index"), lambda: _load(folder)):
        with pytest.raises(ValueError, match=match):
            load()


def test_index_ids_and_metadata_are_checked(folder):
    from geoswc.retrieval.index import BackgroundIndex

    drop_checksums(folder)
    ids = folder / "index" / "ids.txt"
    lines = ids.read_text().splitlines()
    ids.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"ids\.txt.*\d+ ids.*\d+ rows"):
        BackgroundIndex.load(folder / "index")
    ids.write_text("\n".join(lines) + "\n")
    meta_path = folder / "index" / "index.json"
    meta = _read_json(meta_path)
    for key, value in (("dtype", "int8"), ("n_cells", "many"), ("dim", -3)):
        _write_json(meta_path, {**meta, key: value})
        with pytest.raises(ValueError, match=rf"index\.json.*{key}"):
            BackgroundIndex.load(folder / "index")
    meta_path.write_text("{")
    with pytest.raises(ValueError, match=r"index\.json"):
        BackgroundIndex.load(folder / "index")


def test_an_index_for_another_number_of_cells_is_refused(folder):
    offsets = _index_array(folder, "offsets.npy")
    cell_idx = _index_array(folder, "cell_idx.npy")
    # One more (empty) cell than the partition has: consistent on its own, wrong for this model.
    _damage_index(folder, "offsets.npy", np.append(offsets, offsets[-1]))
    meta = _read_json(folder / "index" / "index.json")
    meta["n_cells"] += 1
    _write_json(folder / "index" / "index.json", meta)
    assert cell_idx.max() < meta["n_cells"]
    with pytest.raises(ValueError, match=r"index.*cells"):
        _load(folder)


def test_a_head_file_holding_another_kind_is_refused(folder):
    shutil.copy(folder / "heads" / "hc.safetensors", folder / "heads" / "ce.safetensors")
    drop_checksums(folder)
    with pytest.raises(ValueError, match=r"ce\.safetensors.*'hc'"):
        _load(folder)


def test_head_and_retrieval_files_that_do_not_fit_are_refused(folder, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from geoswc.classifiers import load_head
    from geoswc.geocells import Geocells
    from geoswc.retrieval.model import ResidualRetrievalModule

    geocells = Geocells.load(folder / "cells")
    for path, load in (
        (folder / "heads" / "ce.safetensors", lambda p: load_head(p, geocells=geocells)),
        (folder / "retrieval.safetensors", lambda p: ResidualRetrievalModule.load(p)),
    ):
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata())
        tensors = load_file(str(path))
        key = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 2)
        tensors[key] = tensors[key][:-1].contiguous()
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError, match=path.name + ".*" + key.replace(".", r"\.")):
            load(path)
        path.write_bytes(b"not a safetensors file")
        with pytest.raises(ValueError, match=path.name):
            load(path)


def test_part_dimensions_must_agree(folder):
    from geoswc.retrieval.model import ResidualRetrievalModule, read_metadata

    meta = read_metadata(folder / "retrieval.safetensors")
    wider = ResidualRetrievalModule(int(meta["dim"]) + 8, int(meta["hidden_dim"]))
    wider.save(folder / "retrieval.safetensors", fingerprint=meta["fingerprint"])
    drop_checksums(folder)
    with pytest.raises(ValueError, match=r"retrieval\.safetensors.*dim"):
        _load(folder)
