"""The place-recognition layout (geoswc.data.vpr), UTM (geoswc.data.utm) and the street world."""

from __future__ import annotations

import numpy as np
import pytest
from vpr_fixtures import make_tiny_world

from geoswc.data.utm import latlon_to_utm, utm_to_latlon, zone_letter, zone_number
from geoswc.data.vpr import format_name, parse_name, positives_within, read_split


def test_utm_hand_values():
    # On a central meridian the easting is the false easting and the northing k0 x the meridian arc:
    # WGS84's arc from the equator to 45 N is 4,984,944.38 m, x 0.9996 = 4,982,950.40 m.
    east, north, zone, letter = latlon_to_utm(45.0, 9.0)
    assert (zone, letter) == (32, "T")
    assert float(east) == pytest.approx(500_000.0, abs=1e-6)
    assert float(north) == pytest.approx(4_982_950.40, abs=0.01)
    east, north, zone, letter = latlon_to_utm(-0.0001, 3.0)
    assert float(north) == pytest.approx(10_000_000 - 11.06, abs=0.05) and letter == "M"
    assert zone_number(60.0, 5.0) == 32 and zone_number(78.0, 20.0) == 33 and zone_letter(84.0) == "X"


def test_utm_round_trip_and_scale():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-70, 70, 200), rng.uniform(-179, 179, 200)
    for la, lo in zip(lat, lon):
        e, n, z, letter = latlon_to_utm(la, lo)
        back = utm_to_latlon(e, n, z, letter)
        assert np.allclose(back, (la, lo), atol=1e-7)
    # 0.001 deg of latitude at 40 N is 111.03 m on the ellipsoid (x 0.9996 and the zone's scale near 0.9997)
    e0, n0, z, _ = latlon_to_utm(40.0, -80.0)
    e1, n1, _, _ = latlon_to_utm(40.001, -80.0, zone=z)
    assert float(n1 - n0) == pytest.approx(111.03 * 0.9996 * 1.0002, rel=5e-4)


def test_names():
    name = format_name(585010.28, 4477255.47, zone=17, letter="T", lat=40.44, lon=-79.99, note="x")
    assert name == "@585010.28@4477255.47@17@T@40.44000@-79.99000@@@@@@@@x@.jpg"
    parsed = parse_name("/a/b/" + name)
    assert (parsed.utm_east, parsed.utm_north, parsed.zone, parsed.letter) == (585010.28, 4477255.47, 17, "T")
    # latitude and longitude left empty: computed from the UTM fields
    empty = parse_name("@585010.28@4477255.47@17@T@@@@@@@@@@@.jpg")
    assert empty.lat == pytest.approx(40.4416, abs=1e-3) and empty.lon == pytest.approx(-79.9980, abs=1e-3)
    for bad in ("photo.jpg", "@abc@1@17@T@@@.jpg", "@1@inf@17@T@@@.jpg", "@1@2@99@T@@@.jpg"):
        with pytest.raises(ValueError, match="malformed place-recognition file name"):
            parse_name(bad)


def test_positives_by_brute_force():
    rng = np.random.default_rng(1)
    db = rng.uniform(0, 200, size=(300, 2))
    q = rng.uniform(0, 200, size=(40, 2))
    found = positives_within(q, db, 25.0)
    for qi, pos in enumerate(found):
        brute = np.flatnonzero(np.sqrt(((db - q[qi]) ** 2).sum(1)) <= 25.0)
        assert list(pos) == list(brute)


def test_street_world_layout(tmp_path):
    world = make_tiny_world(tmp_path / "w")
    split = read_split(world, "test")
    assert split.database == sorted(split.database) and all(p.startswith("database/") for p in split.database)
    assert len(split.queries) == 12 and len(split.database) == 2 * 21  # 10..110 m every 5 m, 2 streets
    # every query lies on a street, within 2.5 m of a database photo
    nearest = np.sqrt(((split.queries_utm[:, None] - split.database_utm[None]) ** 2).sum(-1)).min(1)
    assert nearest.max() <= 2.5 + 1e-6
    assert all(len(p) > 0 for p in split.positives())
    # the lat/lon in the names is where the UTM fields point
    lat, lon = utm_to_latlon(split.database_utm[:, 0], split.database_utm[:, 1], split.zone, split.letter)
    assert np.allclose(np.stack([lat, lon], 1), split.database_latlon, atol=1e-5)
    train = read_split(world, "train")
    gap = np.sqrt(((train.database_utm[:, None] - split.database_utm[None]) ** 2).sum(-1)).min()
    assert gap > 1000  # splits are different districts
    with pytest.raises(FileNotFoundError, match="place-recognition layout"):
        read_split(world, "val")
