"""The shared primitives of geoswc.data: the sphere, the choice checker, the file readers, the EXIF decoder."""

import math
import os

import numpy as np
import pytest
import torch

from geoswc.data.exif import dms_to_degrees
from geoswc.data.files import file_inside, read_json_object, read_safetensors_metadata
from geoswc.data.sphere import (
    EARTH_RADIUS_KM,
    destination_deg,
    haversine_km,
    latlon_to_unit,
    pairwise_haversine_km,
    unit_to_latlon,
)
from geoswc.data.validation import check_choice, choice_error


def _points(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)])


def test_unit_vectors_are_s2geometrys_points():
    s2 = pytest.importorskip("s2geometry")
    latlon = _points()
    expected = []
    for lat, lon in latlon:
        p = s2.S2LatLng.FromDegrees(float(lat), float(lon)).ToPoint()
        expected.append([p.x(), p.y(), p.z()])
    np.testing.assert_allclose(latlon_to_unit(latlon), np.array(expected), rtol=0, atol=1e-15)


def test_torch_and_numpy_give_the_same_vectors_and_the_round_trip_returns_the_positions():
    latlon = _points()
    xyz = latlon_to_unit(latlon)
    as_tensor = latlon_to_unit(torch.from_numpy(latlon))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float64
    np.testing.assert_allclose(as_tensor.numpy(), xyz, rtol=0, atol=1e-15)
    np.testing.assert_allclose(unit_to_latlon(xyz * 7.0), latlon, rtol=0, atol=1e-9)
    np.testing.assert_allclose(unit_to_latlon(xyz, assume_unit=True), latlon, rtol=0, atol=1e-6)
    np.testing.assert_allclose(unit_to_latlon(torch.from_numpy(xyz)).numpy(), latlon, rtol=0, atol=1e-9)


def test_one_degree_of_latitude_is_111_19_km_by_both_haversines():
    assert float(haversine_km(10.0, 20.0, 11.0, 20.0)) == pytest.approx(math.pi * 6371.0 / 180, rel=1e-12)
    pair = np.array([[[10.0, 20.0], [11.0, 20.0]]])
    assert pairwise_haversine_km(pair)[0, 0, 1] == pytest.approx(111.19492664455873, rel=1e-12)
    assert EARTH_RADIUS_KM == 6371.0


def test_a_destination_lies_at_the_distance_it_was_sent():
    latlon = _points(200, seed=1)
    latlon[:, 0] = np.clip(latlon[:, 0], -80, 80)
    rng = np.random.default_rng(2)
    dist_km = rng.uniform(0.1, 3000, len(latlon))
    dest = destination_deg(latlon, dist_km, rng.uniform(0, 2 * np.pi, len(latlon)))
    got = haversine_km(latlon[:, 0], latlon[:, 1], dest[:, 0], dest[:, 1])
    np.testing.assert_allclose(got, dist_km, rtol=1e-9)
    assert (np.abs(dest[:, 1]) <= 180).all()


def test_check_choice_returns_the_value_or_names_it_and_the_choices():
    assert check_choice("head", "ce", ("ce", "hc", "mvmf")) == "ce"
    with pytest.raises(ValueError, match=r"^unknown head 'vmff'; choose one of: ce, hc, mvmf$"):
        check_choice("head", "vmff", ("ce", "hc", "mvmf"))
    err = choice_error("dtype", "int8", ("float16", "float32"), source="index.json")
    assert str(err) == "index.json: unknown dtype 'int8'; choose one of: float16, float32"


def test_read_json_object_names_the_file_that_holds_no_object(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert read_json_object(good) == {"a": 1}
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json: expected a JSON object, got list"):
        read_json_object(listed)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        read_json_object(broken)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json_object(tmp_path / "missing.json")


def test_read_safetensors_metadata_reads_metadata_and_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"kind": "head"})
    assert read_safetensors_metadata(path) == {"kind": "head"}
    other = tmp_path / "not.safetensors"
    other.write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"not\.safetensors: not a readable safetensors file"):
        read_safetensors_metadata(other)
    with pytest.raises(FileNotFoundError, match="head weights file not found"):
        read_safetensors_metadata(tmp_path / "gone.safetensors", what="head weights file")


def test_file_inside_refuses_names_that_leave_the_folder(tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    assert file_inside(folder, "a.csv", what="file", source="m.json") == folder / "a.csv"
    for name in ("../a.csv", "/etc/passwd", "C:\\x.csv", "", 3):
        with pytest.raises(ValueError, match=r"^m\.json: file"):
            file_inside(folder, name, what="file", source="m.json")
    os.symlink(tmp_path / "outside.csv", folder / "link.csv")
    with pytest.raises(ValueError, match="is a link that points outside"):
        file_inside(folder, "link.csv", what="file", source="m.json")


def test_dms_to_degrees_decodes_pillow_and_piexif_rationals():
    # 40° 26' 46.14" N = 40.446150°
    assert dms_to_degrees(((40, 1), (26, 1), (4614, 100)), "N") == pytest.approx(40.44615, abs=1e-12)
    assert dms_to_degrees((2.0, 30.0, 0.0), b"W\x00") == -2.5
    with pytest.raises(ValueError):
        dms_to_degrees(((1, 1), (0, 1), (0, 1)), "X")
