import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoswc.cli import main
from geoswc.eval import haversine_km
from geoswc.evaluation.run import TABLE_MODES, parse_mode
from geoswc.geolocator import Geolocator


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    """Five readable photos of different sizes, one corrupt file and one missing file."""
    root = tmp_path_factory.mktemp("evaluate")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = ["a.jpg", "sub/b.jpg", "c.png", "d.jpg", "e.jpg"]
    for img_id, (h, w) in zip(ids, [(48, 64), (64, 48), (60, 60), (48, 64), (40, 64)]):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(images / img_id)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truth = pd.DataFrame(
        {
            "IMG_ID": ids + ["corrupt.jpg", "missing.jpg"],
            "LAT": [48.86, 40.71, 35.68, -33.87, 51.51, 41.9, 37.77],
            "LON": [2.35, -74.0, 139.69, 151.21, -0.13, 12.5, -122.42],
        }
    )
    truth.to_csv(root / "test.csv", index=False)
    return root, truth


def test_parse_mode():
    assert parse_mode("hc") == ("hc", "cell")
    assert parse_mode("mvmf+rrm") == ("mvmf", "swc")
    assert parse_mode("rrm") == (None, "rrm")
    with pytest.raises(ValueError, match="ce, hc, mvmf, rrm"):
        parse_mode("knn")


@pytest.mark.slow
def test_evaluate_end_to_end(tiny_model_dir, test_set, tmp_path, capsys):
    root, truth = test_set
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--meta",
            str(root / "test.csv"),
            "--images",
            str(root / "images"),
            "-o",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "7 in metadata, 5 evaluated, 2 missing or unreadable" in printed

    results = json.loads((out / "results.json").read_text())
    assert list(results) == list(TABLE_MODES)
    model = Geolocator.from_pretrained(tiny_model_dir, device="cpu")
    paths = [root / "images" / i for i in truth["IMG_ID"][:5]]
    for mode in TABLE_MODES:
        res = results[mode]
        assert (res["n_truth"], res["n_scored"], res["n_missing"]) == (7, 5, 2)
        pred = pd.read_csv(out / f"predictions_{mode}.csv")
        assert list(pred.columns) == ["IMG_ID", "LAT", "LON"]
        assert pred["IMG_ID"].tolist() == truth["IMG_ID"][:5].tolist()
        # The same photos through Geolocator.predict (its own decoding and batching) land in the same place.
        head, how = parse_mode(mode)
        expected = np.array([[r["lat"], r["lon"]] for r in model.predict(paths, head=head, mode=how)])
        assert np.allclose(pred[["LAT", "LON"]].to_numpy(), expected, atol=1e-4)
        # Accuracy recomputed by hand: correct when the great-circle distance is <= r, out of all 7 photos.
        d = haversine_km(truth["LAT"][:5], truth["LON"][:5], pred["LAT"], pred["LON"])
        for radius in ("1", "25", "200", "750", "2500"):
            assert res["accuracy"][radius] == pytest.approx(100 * np.sum(d <= float(radius)) / 7)
        assert res["median_km"] == pytest.approx(np.median(d))

    missing = pd.read_csv(out / "missing.csv")
    assert sorted(missing["IMG_ID"]) == ["corrupt.jpg", "missing.jpg"]
    report = (out / "report.md").read_text()
    assert "6371" in report and "hc+rrm" in report and "geoswc evaluate --model" in report
    assert (out / "report.html").is_file()


def test_evaluate_subset_of_modes_and_bad_mode(tiny_model_dir, test_set, tmp_path, capsys):
    root, _ = test_set
    common = [
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--meta",
        str(root / "test.csv"),
        "--images",
        str(root / "images"),
        "--workers",
        "0",
    ]
    assert main(common + ["-o", str(tmp_path / "o1"), "--modes", "rrm", "ce+rrm", "--k", "3"]) == 0
    assert list(json.loads((tmp_path / "o1" / "results.json").read_text())) == ["rrm", "ce+rrm"]
    assert main(common + ["-o", str(tmp_path / "o2"), "--modes", "vmf"]) == 2
    assert "choose one of: ce, hc, mvmf, rrm" in capsys.readouterr().err


def test_benchmark_without_file_says_where_to_get_it(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--benchmark",
            "im2gps3k",
            "--images",
            str(tmp_path),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "im2gps3k" in capsys.readouterr().err
