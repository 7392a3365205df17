import json
import subprocess
import sys
import tarfile
import time

import msgpack
import numpy as np
import pandas as pd
import pytest

from geoswc.cli import main
from geoswc.data.metadata import Exclusions, find_leaks, normalize_photo_id, read_metadata
from geoswc.data.shards import write_shards
from geoswc.data.synth import make_world


def lat_band_labeler(lat, lon):
    """Two granularities: hemisphere and 30-degree latitude band."""
    return np.stack([(lat >= 0).astype(np.int64), np.floor((lat + 90) / 30).astype(np.int64)], axis=1)


def read_tar_samples(path):
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_samples(out, summary):
    merged = {}
    for shard in summary["shards"]:
        samples = read_tar_samples(out / shard["name"])
        assert len(samples) == shard["count"]
        merged.update(samples)
    return merged


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(out, n_train=120, n_test=20, seed=5, progress=False)
    return out


def test_normalize_photo_id():
    assert normalize_photo_id("45/77/3228511372.jpg") == "3228511372"
    assert normalize_photo_id("3228511372.jpg") == "3228511372"
    assert normalize_photo_id("1000269685_e60e9cdfb4_1125_78841376@N00.jpg") == "1000269685"
    assert normalize_photo_id("10201275523") == "10201275523"


def test_read_metadata_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("IMG_ID,AUTHOR,LAT,LON\na.jpg,x,10,20\nb.jpg,y,95,20\n")
    with pytest.raises(ValueError, match=r"m.csv: line 3, column LAT: value 95.0 out of range \[-90, 90\]"):
        read_metadata(path)
    path.write_text("IMG_ID,LAT\na.jpg,1\n")
    with pytest.raises(ValueError, match="missing column LON"):
        read_metadata(path)
    path.write_text("IMG_ID,LAT,LON\na.jpg,1,2\n\na.jpg,1,2\n")
    repeated = r"line 4, column IMG_ID: duplicate image ID 'a.jpg' \(also on line 2\)"
    with pytest.raises(ValueError, match=repeated):
        read_metadata(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_metadata(tmp_path / "nope.csv")


def test_read_metadata_takes_the_aliases_of_every_position_table_and_keeps_other_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image_id,Owner,Latitude,lng,S3_Label\n45/77/1.jpg,a@N00,1.5,-2.5,2\n2.jpg,b,0,0,1\n")
    frame = read_metadata(path)
    assert list(frame.columns) == ["IMG_ID", "AUTHOR", "LAT", "LON", "S3_Label"]
    assert frame["LAT"].tolist() == [1.5, 0.0] and frame["S3_Label"].tolist() == ["2", "1"]
    # Training metadata rejects repeated ids only; two ids of one photo are the benchmark readers' concern.
    path.write_text("IMG_ID,LAT,LON\n45/77/3228511372.jpg,1,2\n3228511372.jpg,1,2\n")
    assert len(read_metadata(path)) == 2
    path.write_text("IMG_ID,AUTHOR,LAT,LON\n")
    assert read_metadata(path).empty


def _prepare_inputs(world, tmp_path):
    """Training CSV with one missing file, one corrupt file and leaks by author and by photo id."""
    meta = read_metadata(world / "train.csv")
    meta.loc[len(meta)] = ["aa/bb/1111111111.jpg", "99999999@N00", 1.0, 2.0]  # no such file
    (world / "images" / "aa" / "cc").mkdir(parents=True, exist_ok=True)
    (world / "images" / "aa" / "cc" / "2222222222.jpg").write_bytes(b"\xff\xd8garbage")
    meta.loc[len(meta)] = ["aa/cc/2222222222.jpg", "88888888@N00", 3.0, 4.0]
    train_csv = tmp_path / "train.csv"
    meta.to_csv(train_csv, index=False)
    leak_author = meta["AUTHOR"].iloc[0]
    leak_photo = normalize_photo_id(meta["IMG_ID"].iloc[1])
    bench = tmp_path / "bench.csv"
    pd.DataFrame(
        {
            "IMG_ID": [f"{leak_photo}_e60e9cdfb4_1125_{meta['AUTHOR'].iloc[1]}.jpg", "5.jpg"],
            "AUTHOR": ["someone@N00", leak_author],
            "LAT": [0.0, 0.0],
            "LON": [0.0, 0.0],
        }
    ).to_csv(bench, index=False)
    n_by_author = int((meta["AUTHOR"] == leak_author).sum())
    by_id_counted = int(meta["AUTHOR"].iloc[1] != leak_author)
    return meta, train_csv, bench, n_by_author, by_id_counted


def test_write_shards_labels_exclusions_and_skips(world, tmp_path):
    meta, _, bench, n_by_author, n_by_id = _prepare_inputs(world, tmp_path)
    out = tmp_path / "shards"
    summary = write_shards(
        meta,
        out,
        images_root=world / "images",
        labeler=lat_band_labeler,
        fingerprint="bands-v1",
        exclusions=Exclusions.from_files([bench]),
        samples_per_shard=25,
        resize=48,
        progress=False,
    )
    assert summary["excluded_author"] == n_by_author and summary["excluded_id"] == n_by_id
    assert summary["skipped_missing"] == 1 and summary["skipped_corrupt"] == 1
    assert {(s["id"], s["reason"]) for s in summary["skipped"]} == {
        ("aa/bb/1111111111.jpg", "missing"),
        ("aa/cc/2222222222.jpg", "corrupt"),
    }
    assert summary["written"] == 120 - n_by_author - n_by_id
    assert json.loads((out / "summary.json").read_text())["written"] == summary["written"]
    assert all(s["count"] <= 25 for s in summary["shards"])

    samples = all_samples(out, summary)
    assert len(samples) == summary["written"]
    by_id = meta.set_index("IMG_ID")
    from geoswc.data.images import decode_image

    for parts in samples.values():
        record = json.loads(parts["json"])
        row = by_id.loc[record["id"]]
        assert record["author"] == row["AUTHOR"]
        assert (record["lat"], record["lon"]) == (row["LAT"], row["LON"])
        assert (
            record["labels"] == lat_band_labeler(np.array([row["LAT"]]), np.array([row["LON"]]))[0].tolist()
        )
        assert record["fingerprint"] == "bands-v1"
        assert min(decode_image(parts["jpg"]).size) == 48
    assert meta["AUTHOR"].iloc[0] not in {json.loads(p["json"])["author"] for p in samples.values()}


def test_resume_refuses_other_settings(world, tmp_path):
    meta = read_metadata(world / "train.csv")
    write_shards(meta, tmp_path, images_root=world / "images", samples_per_shard=50, progress=False)
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(meta, tmp_path, images_root=world / "images", samples_per_shard=40, progress=False)


@pytest.mark.slow
def test_killed_job_resumes_without_duplicates_or_gaps(tmp_path):
    world = tmp_path / "world"
    make_world(world, n_train=600, n_test=10, seed=2, progress=False)
    command = [
        sys.executable,
        "-m",
        "geoswc",
        "data",
        "shards",
        str(world / "train.csv"),
        "--images",
        str(world / "images"),
        "-o",
        str(tmp_path / "killed"),
        "--samples-per-shard",
        "20",
        "--workers",
        "1",
        "--resize",
        "200",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed" / "_progress"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(progress.glob("0*.json"))) < 3:
        time.sleep(0.02)
    process.kill()
    process.wait()
    done_before = len(list(progress.glob("0*.json")))
    assert 3 <= done_before < 30, "the job should have been killed part-way"
    assert main(command[3:]) == 0
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    write_shards(
        read_metadata(world / "train.csv"),
        tmp_path / "clean",
        images_root=world / "images",
        samples_per_shard=20,
        resize=200,
        progress=False,
    )
    clean = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert summary["written"] == clean["written"] == 600
    assert summary["shards"] == clean["shards"]
    for shard in clean["shards"]:
        assert (tmp_path / "killed" / shard["name"]).read_bytes() == (
            tmp_path / "clean" / shard["name"]
        ).read_bytes()
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_msgpack_source(world, tmp_path):
    meta = read_metadata(world / "train.csv")
    ids = meta["IMG_ID"].tolist()
    for index, chunk in enumerate((ids[:50], ids[50:100])):
        with open(tmp_path / f"shard_{index}.msg", "wb") as f:
            for img_id in chunk:
                f.write(msgpack.packb({"image": (world / "images" / img_id).read_bytes(), "id": img_id}))
            if index == 1:
                f.write(msgpack.packb({"image": b"not a jpeg", "id": ids[100]}))
                f.write(
                    msgpack.packb({"image": (world / "images" / ids[0]).read_bytes(), "id": "zz/zz/1.jpg"})
                )
    bench = tmp_path / "bench.csv"
    pd.DataFrame({"IMG_ID": [ids[3].split("/")[-1]], "LAT": [0.0], "LON": [0.0]}).to_csv(bench, index=False)
    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "shards",
                str(world / "train.csv"),
                "--msgpack",
                str(tmp_path / "shard_*.msg"),
                "-o",
                str(out),
                "--exclude",
                str(bench),
                "--samples-per-shard",
                "30",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 99 and summary["excluded_id"] == 1 and summary["excluded_author"] == 0
    assert summary["skipped_corrupt"] == 1 and summary["skipped_unlisted"] == 1
    assert summary["skipped_missing"] == 120 - 101
    samples = all_samples(out, summary)
    written = sorted(json.loads(p["json"])["id"] for p in samples.values())
    assert written == sorted(set(ids[:100]) - {ids[3]})
    # Without --resize the original JPEG bytes are stored untouched.
    first = next(p for p in samples.values() if json.loads(p["json"])["id"] == ids[0])
    assert first["jpg"] == (world / "images" / ids[0]).read_bytes()


def test_check_leaks(world, tmp_path, capsys):
    meta, train_csv, bench, n_by_author, n_by_id = _prepare_inputs(world, tmp_path)
    report = find_leaks(train_csv, [bench])
    assert report["excluded_author"] == n_by_author and report["excluded_id"] == n_by_id
    entry = report["benchmarks"][str(bench)]
    assert entry["shared_authors"] == 1 and entry["shared_photo_ids"] == 1
    assert main(["data", "check-leaks", str(train_csv), str(bench)]) == 0
    out = capsys.readouterr().out
    assert f"--exclude would drop {n_by_author} photos by author and {n_by_id} more by photo id" in out
    assert main(["data", "check-leaks", str(train_csv), str(bench), "--fail-on-leak"]) == 1
    assert main(["data", "check-leaks", str(train_csv), str(tmp_path / "none.csv")]) == 2


def test_check_leaks_real_benchmarks(shared_reference, world):
    benches = [shared_reference / "benchmarks" / name for name in ("im2gps3k_places365.csv", "yfcc4k.csv")]
    exclusions = Exclusions.from_files(benches)
    assert len(exclusions.photo_ids) == 2997 + 4536
    assert "1000269685" in exclusions.photo_ids
    report = find_leaks(world / "train.csv", benches)
    assert report["excluded_author"] == 0 and report["excluded_id"] == 0


def test_leakage_ids_use_the_evaluation_rule():
    """Leakage control and scoring must recognise a photo by the same key (Im2GPS prefixes included)."""
    from geoswc.eval import normalize_image_id

    names = [
        "Athens_00016_1004463976_7d8c7a2b1e_1110_45789120@N00.jpg",
        "China_00092_5.jpg",
        "Washington_00092_6.jpg",
        "45/77/3228511372.jpg",
        "10201275523.jpg",
    ]
    assert [normalize_photo_id(n) for n in names] == [normalize_image_id(n) for n in names]
    assert normalize_photo_id(names[0]) == "1004463976"
    assert normalize_photo_id(names[1]) != normalize_photo_id(names[2])


def test_empty_metadata_file_names_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.csv: empty file"):
        read_metadata(empty)
