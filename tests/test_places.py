"""Offline place names (`geoswc.data.places`) against known cities and hand-computed distances."""

import math

import numpy as np
import pytest

from geoswc.data import places


@pytest.mark.parametrize(
    "latlon, name, country_code, country, continent",
    [
        ((48.8566, 2.3522), "Paris", "FR", "France", "EU"),
        ((35.6762, 139.6503), "Tokyo", "JP", "Japan", "AS"),
        ((-33.8688, 151.2093), "Sydney", "AU", "Australia", "OC"),
        ((-22.5700, 17.0836), "Windhoek", "NA", "Namibia", "AF"),  # "NA" must not read as a missing value
        ((-34.6037, -58.3816), "Buenos Aires", "AR", "Argentina", "SA"),
    ],
)
def test_known_cities(latlon, name, country_code, country, continent):
    (place,) = places.reverse_geocode(np.array([latlon]))
    assert place.name == name
    assert place.country_code == country_code
    assert place.country == country
    assert place.distance_km < 10
    assert places.country_codes(np.array([latlon])).tolist() == [country_code]
    assert places.continent_of([country_code]).tolist() == [continent]


def test_mid_atlantic_has_no_place_under_the_nearest_place_rule():
    point = np.array([[0.0, -30.0]])  # ~1,000 km from any coast
    assert places.reverse_geocode(point) == [places.NO_PLACE]
    assert places.country_codes(point).tolist() == [""]
    assert places.continent_of([""]).tolist() == [""]
    # Without the cut-off the nearest place is named, over 500 km away.
    (far,) = places.reverse_geocode(point, max_distance_km=None)
    assert far.name and far.distance_km > 500


def test_distance_is_great_circle_to_the_gazetteer_place():
    gaz = places.gazetteer()
    # 0.1 degree of latitude north of a known place: 11.119 km on R = 6371 km (it stays the nearest place).
    i = int(np.flatnonzero(gaz.names_ == "Reykjavik")[0])
    lat, lon = gaz.latlon_deg_[i]
    idx, dist_km = gaz.nearest(np.array([[lat + 0.01, lon]]))
    assert idx[0] == i
    assert dist_km[0] == pytest.approx(0.01 * math.pi / 180 * 6371.0, rel=1e-6)


def test_nearest_matches_brute_force_haversine():
    gaz = places.gazetteer()
    rng = np.random.default_rng(0)
    queries = np.column_stack([rng.uniform(-60, 70, 40), rng.uniform(-180, 180, 40)])
    idx, dist_km = gaz.nearest(queries)
    lat1, lon1 = np.radians(queries[:, :1]), np.radians(queries[:, 1:])
    lat2, lon2 = np.radians(gaz.latlon_deg_[:, 0]), np.radians(gaz.latlon_deg_[:, 1])
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    brute_km = 2 * 6371.0 * np.arcsin(np.sqrt(a))
    np.testing.assert_allclose(dist_km, brute_km.min(axis=1), rtol=1e-9, atol=1e-6)


def test_country_precision_names_only_the_country():
    (place,) = places.reverse_geocode(np.array([[48.8566, 2.3522]]), precision="country")
    assert (place.name, place.admin1, place.admin2, place.country_code, place.country) == (
        "",
        "",
        "",
        "FR",
        "France",
    )
    assert math.isnan(place.distance_km)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="choose one of: exact, city, region, country"):
        places.reverse_geocode(np.array([[0.0, 0.0]]), precision="street")
    with pytest.raises(ValueError, match="shape"):
        places.country_codes(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\[-90, 90\]"):
        places.country_codes(np.array([[95.0, 0.0]]))
    assert places.reverse_geocode(np.zeros((0, 2))) == []


def test_continent_table_covers_every_gazetteer_country():
    codes = sorted(set(places.gazetteer().codes_.tolist()))
    continents = places.continent_of(codes)
    assert set(continents) <= set(places.CONTINENTS)
    assert "" not in continents.tolist(), [c for c, k in zip(codes, continents) if not k]
    assert places.country_name("XK") == "Kosovo" and places.country_name("ZZ") == "ZZ"
