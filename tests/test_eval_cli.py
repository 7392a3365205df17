import json

import pytest

from geoswc.cli import main

KM_PER_DEG = 111.19492664455873


@pytest.fixture()
def files(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text(
        "IMG_ID,AUTHOR,LAT,LON,S3_Label\n"
        "1000269685_e60e9cdfb4_1125_78841376@N00.jpg,me,0,0,1\n"
        "2000_e60e9cdfb4_1125_78841376@N00.jpg,me,10,20,1\n"
        "3000_e60e9cdfb4_1125_78841376@N00.jpg,me,-10,-20,1\n"
    )
    pred = tmp_path / "pred.csv"
    # 0.5 km and 300 km along meridians; the third photo has no prediction.
    pred.write_text(f"img_id,lat,lon\n1000269685,{0.5 / KM_PER_DEG},0\n2000.jpg,{10 + 300 / KM_PER_DEG},20\n")
    return pred, truth


def test_score_json_is_exactly_one_object(files, capsys):
    pred, truth = files
    assert main(["score", str(pred), str(truth), "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out)
    assert (res["n_truth"], res["n_scored"], res["n_missing"]) == (3, 2, 1)
    third = 100 / 3
    assert res["accuracy"] == pytest.approx(
        {
            "0.1": 0,
            "1": third,
            "5": third,
            "10": third,
            "25": third,
            "200": third,
            "750": 2 * third,
            "2500": 2 * third,
        }
    )
    assert res["median_km"] == pytest.approx(150.25) and res["mean_km"] == pytest.approx(150.25)


def test_score_table_states_the_protocol(files, capsys):
    pred, truth = files
    assert main(["score", str(pred), str(truth)]) == 0
    out = capsys.readouterr().out
    assert "R = 6371 km" in out and "<= r" in out and "count as wrong" in out
    row = next(line for line in out.splitlines() if line.startswith("predictions "))
    assert row.split() == [
        "predictions",
        "0.0",
        "33.3",
        "33.3",
        "33.3",
        "33.3",
        "33.3",
        "66.7",
        "66.7",
        "150.2",
        "2",
        "1",
    ]


@pytest.mark.parametrize(
    "pred_text, message",
    [
        ("", "empty file"),
        ("IMG_ID,LAT\na,1\n", "missing column LON"),
        (
            "IMG_ID,LAT,LON\n2000,1,2\n2000.jpg,1,2\n",
            "line 3, column IMG_ID: image ID '2000.jpg' names the same",
        ),
        ("IMG_ID,LAT,LON\n2000,95,2\n", "line 2, column LAT: value 95.0 out of range"),
        ("IMG_ID,LAT,LON\n2000,1,east\n", "line 2, column LON: non-numeric value 'east'"),
    ],
)
def test_score_bad_predictions_exit_2_with_a_clear_message(files, capsys, pred_text, message):
    pred, truth = files
    pred.write_text(pred_text)
    assert main(["score", str(pred), str(truth), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.startswith("geoswc score: error: ")
        and str(pred) in captured.err
        and message in captured.err
    )


def test_score_missing_file(files, capsys):
    pred, truth = files
    assert main(["score", str(pred), str(truth.with_name("absent.csv"))]) == 2
    assert "absent.csv" in capsys.readouterr().err


def test_score_reproduces_published_im2gps_numbers(test_data, tmp_path, capsys):
    from geoswc.eval import read_peer_predictions

    peer = read_peer_predictions(test_data / "peer_predictions" / "im2gps" / "base_M-fstar.csv")
    pred = tmp_path / "pred.csv"
    peer.predictions.to_csv(pred, index=False)
    assert main(["score", str(pred), str(test_data / "benchmarks" / "im2gps_places365.csv"), "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert [round(acc[r], 1) for r in ("1", "25", "200", "750", "2500")] == [15.2, 40.9, 51.5, 65.4, 78.5]
