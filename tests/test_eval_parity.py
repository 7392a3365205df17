"""Scoring published per-photo predictions reproduces the published accuracies (R = 6371 km, <= r)."""

from pathlib import Path

import numpy as np
import pytest

from geoswc.eval import haversine_km, read_peer_predictions, score_predictions

# The accuracies at 1 / 25 / 200 / 750 / 2500 km published for these files (../shared/README.md).
PUBLISHED = {
    ("im2gps3k", "base_M-fstar.csv"): (9.7, 27.0, 35.6, 49.1, 66.0),
    ("im2gps", "base_M-fstar.csv"): (15.2, 40.9, 51.5, 65.4, 78.5),
    ("im2gps3k", "ISNs_M-fstar-S3.csv"): (10.5, 28.0, 36.6, 49.7, 66.0),
    ("im2gps", "ISNs_M-fstar-S3.csv"): (16.9, 43.0, 51.9, 66.7, 80.2),
}
SUMMARY_RADII = ("1", "25", "200", "750", "2500")
ROWS = {"im2gps": 237, "im2gps3k": 2997}


def _peer_files(root: Path):
    files = sorted(root.glob("*/*.csv"))
    assert len(files) == 12, f"expected 6 files per benchmark under {root}"
    return files


def _check_file(path: Path):
    peer = read_peer_predictions(path)
    benchmark = path.parent.name
    assert len(peer.truth) == ROWS[benchmark]
    result = score_predictions(peer.predictions, peer.truth)
    assert (result["n_truth"], result["n_missing"]) == (ROWS[benchmark], 0)
    ours = [round(result["accuracy"][r], 1) for r in SUMMARY_RADII]
    # The file's own summary row (fractions, printed to 6 decimals) and its mean deviation.
    assert ours == [round(peer.summary["accuracy"][r], 1) for r in SUMMARY_RADII], path.name
    assert result["mean_km"] == pytest.approx(peer.summary["mean_km"], abs=0.005)
    # Per-photo distances agree with the file's, which are rounded to 10 m.
    ours_km = haversine_km(
        peer.truth["LAT"], peer.truth["LON"], peer.predictions["LAT"], peer.predictions["LON"]
    )
    assert np.abs(ours_km - peer.distance_km).max() <= 0.0051
    published = PUBLISHED.get((benchmark, path.name))
    if published is not None:
        assert tuple(ours) == published, path.name
    return (benchmark, path.name)


def test_parity_with_the_copy_in_tests_data(test_data):
    checked = {_check_file(p) for p in _peer_files(test_data / "peer_predictions")}
    assert set(PUBLISHED) <= checked


def test_parity_with_shared_reference(shared_reference):
    checked = {_check_file(p) for p in _peer_files(shared_reference / "peer_predictions")}
    assert set(PUBLISHED) <= checked


def test_peer_summary_parsed_from_the_tail(test_data):
    peer = read_peer_predictions(test_data / "peer_predictions" / "im2gps" / "base_M-fstar.csv")
    assert peer.summary["accuracy"] == pytest.approx(
        {"1": 15.1899, "25": 40.9283, "200": 51.4768, "750": 65.4008, "2500": 78.481}
    )
    assert peer.summary["mean_km"] == 1905.31
    # IDs whose hex secret contains "acc" are predictions, not the start of the summary block.
    big = read_peer_predictions(test_data / "peer_predictions" / "im2gps3k" / "ISNs_M-fstar-S3.csv")
    assert "109515826_6e23accec7_54_18684820@N00.jpg" in set(big.truth["IMG_ID"])


def test_peer_reader_rejects_other_files(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("IMG_ID,LAT,LON\na,1,2\n")
    with pytest.raises(ValueError, match=r"x.csv: line 1: expected header img_id,gt_lat"):
        read_peer_predictions(f)
