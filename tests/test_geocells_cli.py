"""`geoswc cells build | assign` end to end through `main([...])`."""

import numpy as np
import pandas as pd
import pytest

from geoswc.cli import main
from geoswc.geocells import Geocells, Partition, S2Partitioner
from geoswc.geocells.io import read_coordinates


def test_cells_build_writes_the_folder_and_prints_a_summary(test_data, tmp_path, capsys):
    coords = test_data / "mp16_sample_3k.csv"
    out = tmp_path / "cells"
    rc = main(
        ["cells", "build", str(coords), "-o", str(out), "--min-images", "3", "--max-images", "60", "25", "10"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    loaded = Geocells.load(out)
    _, lat, lon = read_coordinates(coords)
    direct = S2Partitioner(min_images=3, max_images=(60, 25, 10)).fit(lat, lon).geocells_
    assert loaded.fingerprint == direct.fingerprint
    for part in direct.partitions:
        kept = int(part.counts.sum())
        assert (out / f"{part.name}.csv").is_file()
        assert f"{part.name:<20} {len(part):>8} {kept:>10} {3000 - kept:>10}" in printed
    assert f"fingerprint: {direct.fingerprint}" in printed


def test_cells_build_with_target_cells_and_lowercase_columns(tmp_path, capsys):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"latitude": rng.uniform(-60, 60, 800), "longitude": rng.uniform(-180, 180, 800)})
    df.to_csv(tmp_path / "pts.csv", index=False)
    rc = main(
        [
            "cells",
            "build",
            str(tmp_path / "pts.csv"),
            "-o",
            str(tmp_path / "out"),
            "--min-images",
            "2",
            "--max-images",
            "--target-cells",
            "40",
            "--start-level",
            "1",
        ]
    )
    assert rc == 0
    geocells = Geocells.load(tmp_path / "out")
    assert geocells.names == ["cells_2_n40"]
    assert 40 <= len(geocells.fine) <= 42


def test_cells_assign_adds_class_label(test_data, tmp_path, capsys):
    cells = test_data / "geoestimation_cells_50_5000.csv"
    coords = tmp_path / "pts.csv"
    pd.DataFrame(
        {"IMG_ID": ["a", "b", "c"], "lat": [48.8566, -48.0, 40.7128], "lon": [2.3522, -130.0, -74.006]}
    ).to_csv(coords, index=False)
    assert main(["cells", "assign", str(cells), str(coords), "-o", str(tmp_path / "out.csv")]) == 0
    out = pd.read_csv(tmp_path / "out.csv")
    partition = Partition.load_csv(cells)
    assert list(out.columns) == ["IMG_ID", "lat", "lon", "class_label"]
    expected = partition.assign(out["lat"].to_numpy(), out["lon"].to_numpy())
    assert out["class_label"].tolist() == expected.tolist()
    assert expected[1] == -1 and expected[0] >= 0
    assert "outside every cell: 1" in capsys.readouterr().out
    assert (
        main(["cells", "assign", str(cells), str(coords), "-o", str(tmp_path / "near.csv"), "--nearest"]) == 0
    )
    assert (pd.read_csv(tmp_path / "near.csv")["class_label"] >= 0).all()


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("x,y\n1,2\n", [], "no latitude column found; expected one of LAT, latitude in any case"),
        ("LAT,LON\n1,2\n", ["--lat-col", "Y"], "no latitude column 'Y'; columns are: LAT, LON"),
        ("LAT,LON\n1,2\nabc,3\n", [], "row 2 (line 3), column 'LAT': 'abc' is not a number"),
        ("LAT,LON\n1,2\n10,181\n", [], "row 2 (line 3), column 'LON': '181' is outside [-180, 180]"),
        ("LAT,LON\n", [], "no rows"),
    ],
)
def test_cells_build_reports_bad_coordinates(tmp_path, capsys, content, args, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["cells", "build", str(path), "-o", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_cells_assign_reports_missing_files(tmp_path, capsys):
    assert (
        main(
            [
                "cells",
                "assign",
                str(tmp_path / "none.csv"),
                str(tmp_path / "p.csv"),
                "-o",
                str(tmp_path / "o.csv"),
            ]
        )
        == 2
    )
    assert "cells file not found" in capsys.readouterr().err
