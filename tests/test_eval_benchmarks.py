import pandas as pd
import pytest

from geoswc.eval import load_benchmark, normalize_image_id, read_locations


@pytest.mark.parametrize(
    "image_id, key",
    [
        ("1000269685_e60e9cdfb4_1125_78841376@N00.jpg", "1000269685"),
        ("some/dir/1000269685_e60e9cdfb4_1125_78841376@N00.jpg", "1000269685"),
        ("C:\\photos\\1000269685_e60e9cdfb4_1125_78841376@N00.JPG", "1000269685"),
        ("1000269685", "1000269685"),
        (1000269685, "1000269685"),
        ("45/77/3228511372.jpg", "3228511372"),
        ("10201275523.jpg", "10201275523"),
        ("Athens_00016_516320955_2f7c0642b4_212_36764971@N00.jpg", "516320955"),
        # The 10-digit photo id is also valid hex; the end anchor keeps "00092" from being read as the id.
        ("China_00092_1004463976_03bb680078_1105_91728102@N00.jpg", "1004463976"),
        ("8765432_0123abcdef_b.jpg", "8765432"),
        ("holiday.photo.v2", "holiday.photo.v2"),
        ("IMG_0042.png", "IMG_0042"),
    ],
)
def test_normalize_image_id(image_id, key):
    assert normalize_image_id(image_id) == key


def _write(path, text):
    path.write_text(text)
    return path


def test_read_locations_accepts_aliases_and_drops_other_columns(tmp_path):
    f = _write(
        tmp_path / "p.csv",
        "img_id,Latitude,long,author,score\na.jpg,1.5,-2.5,me,0.3\n\nb.jpg,-90,180,you,1\n",
    )
    df = read_locations(f)
    assert list(df.columns) == ["IMG_ID", "AUTHOR", "LAT", "LON"]
    assert df["IMG_ID"].tolist() == ["a.jpg", "b.jpg"]
    assert df[["LAT", "LON"]].to_numpy().tolist() == [[1.5, -2.5], [-90.0, 180.0]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"empty file"),
        ("IMG_ID,LAT,LON\n", r"no rows"),
        ("IMG_ID,LAT\na,1\n", r"missing column LON"),
        ("IMG_ID,LAT,LON\na,1,2\nb,north,2\n", r"line 3, column LAT: non-numeric value 'north'"),
        ("IMG_ID,lat,lon\na,1,2\nb,1,\n", r"line 3, column lon: empty value"),
        (
            "IMG_ID,LAT,LON\na,1,2\n\nb,1,180.5\n",
            r"line 4, column LON: value 180.5 out of range \[-180, 180\]",
        ),
        ("IMG_ID,LAT,LON\na,-90.01,0\n", r"line 2, column LAT: value -90.01 out of range"),
        (
            "IMG_ID,LAT,LON\na,nan,0\n",
            r"line 2, column LAT: non-numeric value 'nan'|line 2, column LAT: value nan",
        ),
        ("IMG_ID,LAT,LON\na,inf,0\n", r"line 2, column LAT: value inf out of range"),
        ("IMG_ID,LAT,LON\na,1,2\n,1,2\n", r"line 3, column IMG_ID: empty image ID"),
        (
            "IMG_ID,LAT,LON\na,1,2\nb,1,2\na,3,4\n",
            r"line 4, column IMG_ID: duplicate image ID 'a' \(also on line 2\)",
        ),
        (
            "IMG_ID,LAT,LON\n1000269685,1,2\nx/1000269685_e60e9cdfb4_1125_78841376@N00.jpg,1,2\n",
            r"line 3, column IMG_ID: image ID 'x/1000269685_e60e9cdfb4_1125_78841376@N00.jpg' names the same "
            r"photo '1000269685' as '1000269685' on line 2",
        ),
    ],
)
def test_read_locations_errors_name_file_line_and_column(tmp_path, text, message):
    f = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=message) as err:
        read_locations(f)
    assert str(f) in str(err.value)


def test_positions_tables_have_one_reader():
    from geoswc.data import metadata
    from geoswc.eval import benchmarks

    assert read_locations is metadata.read_locations
    assert benchmarks.standardize_locations is metadata.standardize_locations
    assert benchmarks.COLUMN_ALIASES is metadata.COLUMN_ALIASES


def test_read_locations_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_locations(tmp_path / "nope.csv")


def test_load_benchmark_by_name_needs_a_path_and_says_where_to_get_it():
    with pytest.raises(FileNotFoundError, match=r"im2gps3k.*GeoEstimation"):
        load_benchmark("im2gps3k")
    with pytest.raises(
        ValueError, match=r"unknown benchmark 'im2gps5k'; choose one of: im2gps, im2gps3k, yfcc4k"
    ):
        load_benchmark("im2gps5k")


def test_load_benchmark_im2gps_copy(test_data):
    path = test_data / "benchmarks" / "im2gps_places365.csv"
    df = load_benchmark("im2gps", path)
    assert len(df) == 237 and list(df.columns) == ["IMG_ID", "AUTHOR", "LAT", "LON"]
    assert load_benchmark(path).equals(df)
    raw = pd.read_csv(path)
    assert df["IMG_ID"].tolist() == raw["IMG_ID"].tolist()
    assert df["LAT"].tolist() == raw["LAT"].tolist()


@pytest.mark.parametrize(
    "name, file, rows, columns",
    [
        ("im2gps", "im2gps_places365.csv", 237, ["IMG_ID", "AUTHOR", "LAT", "LON"]),
        ("im2gps3k", "im2gps3k_places365.csv", 2997, ["IMG_ID", "AUTHOR", "LAT", "LON"]),
        ("yfcc4k", "yfcc4k.csv", 4536, ["IMG_ID", "LAT", "LON"]),
    ],
)
def test_load_shared_benchmarks(shared_reference, name, file, rows, columns):
    df = load_benchmark(name, shared_reference / "benchmarks" / file)
    assert len(df) == rows and list(df.columns) == columns
    # Every photo keeps its own key: no two ground-truth rows merge under the ID rule.
    assert len({normalize_image_id(i) for i in df["IMG_ID"]}) == rows


def test_mp16_format_relative_paths(tmp_path):
    f = _write(
        tmp_path / "mp16_places365.csv",
        "IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban\n"
        "45/77/3228511372.jpg,12345@N00,48.85,2.35,2,12,353,0.1,0.2,0.7\n"
        "a0/1b/987654321.jpg,999@N01,-33.9,151.2,0,4,325,0.4,0.2,0.4\n",
    )
    df = load_benchmark("mp16", f)
    assert [normalize_image_id(i) for i in df["IMG_ID"]] == ["3228511372", "987654321"]
    assert df["LON"].tolist() == [2.35, 151.2]


def test_vectorised_and_scalar_normalisation_agree(test_data):
    from geoswc.eval.benchmarks import normalize_image_ids

    ids = pd.read_csv(test_data / "benchmarks" / "im2gps_places365.csv")["IMG_ID"].tolist()
    ids += ["a/b\\c.d.JPEG", "  17  ", "x_0123456789_7_1@N00.png", "IMG_1.tif"]
    assert normalize_image_ids(ids) == [normalize_image_id(i) for i in ids]
