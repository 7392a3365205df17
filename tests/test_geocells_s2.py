"""Vectorised S2 ids against s2geometry, the independent reference."""

import numpy as np
import pytest
import s2geometry as s2

from geoswc.geocells import s2 as gs2


def reference_ids(lat, lon):
    return np.array(
        [
            s2.S2CellId(s2.S2LatLng.FromDegrees(a, b)).id()
            for a, b in zip(np.ravel(lat).tolist(), np.ravel(lon).tolist())
        ],
        dtype=np.uint64,
    )


def uniform_sphere(n, seed):
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    return lat, lon


@pytest.fixture(scope="session")
def million_points():
    lat, lon = uniform_sphere(1_000_000, seed=2021)
    return lat, lon, reference_ids(lat, lon)


@pytest.mark.slow
def test_one_million_random_points_bit_identical(million_points):
    lat, lon, ref = million_points
    ids = gs2.latlng_to_cell_id(lat, lon)
    assert ids.dtype == np.uint64
    np.testing.assert_array_equal(ids, ref)


@pytest.mark.slow
def test_parents_and_levels_of_million_points(million_points):
    lat, lon, ref = million_points
    ids = gs2.latlng_to_cell_id(lat[:20000], lon[:20000])
    for level in (0, 2, 7, 13, 22, 29, 30):
        expected = np.array(
            [s2.S2CellId(int(i)).parent(level).id() for i in ref[:20000].tolist()], dtype=np.uint64
        )
        parents = gs2.cell_id_parent(ids, level)
        np.testing.assert_array_equal(parents, expected)
        assert (gs2.cell_id_level(parents) == level).all()


EDGE_POINTS = [
    (0.0, 0.0),
    (90.0, 0.0),
    (-90.0, 0.0),
    (90.0, 180.0),
    (-90.0, -123.4),
    (0.0, 180.0),
    (0.0, -180.0),
    (45.0, 180.0),
    (-45.0, -180.0),
    (12.3, 179.9999999999),
    (12.3, -179.9999999999),
    # Face boundaries: |x| = |y|, |x| = |z|, |y| = |z| on all six faces.
    (0.0, 45.0),
    (0.0, 135.0),
    (0.0, -45.0),
    (0.0, -135.0),
    (45.0, 0.0),
    (-45.0, 0.0),
    (45.0, 90.0),
    (-45.0, 90.0),
    (45.0, 180.0),
    (45.0, -90.0),
    (-45.0, -90.0),
    # Cube corners (three components equal in magnitude).
    (35.26438968275465, 45.0),
    (-35.26438968275465, 135.0),
    (35.26438968275465, -45.0),
    (-35.26438968275465, -135.0),
    (0.0, 90.0),
    (0.0, -90.0),
]


@pytest.mark.parametrize("lat, lon", EDGE_POINTS)
def test_edge_points(lat, lon):
    assert int(gs2.latlng_to_cell_id(lat, lon)) == int(reference_ids([lat], [lon])[0])


def test_points_exactly_on_cell_edges_and_vertices():
    lat, lon = uniform_sphere(3000, seed=7)
    ref = reference_ids(lat, lon)
    edge_lat, edge_lon = [], []
    for k, leaf in enumerate(ref.tolist()):
        cell = s2.S2Cell(s2.S2CellId(leaf).parent(k % 31))
        for v in range(4):
            a, b = cell.GetVertex(v), cell.GetVertex((v + 1) % 4)
            ll = s2.S2LatLng(a)
            edge_lat.append(ll.lat().degrees())
            edge_lon.append(ll.lng().degrees())
            # The edge midpoint, on the great-circle arc between two vertices.
            mx, my, mz = a.x() + b.x(), a.y() + b.y(), a.z() + b.z()
            edge_lat.append(np.degrees(np.arctan2(mz, np.hypot(mx, my))))
            edge_lon.append(np.degrees(np.arctan2(my, mx)))
    np.testing.assert_array_equal(
        gs2.latlng_to_cell_id(edge_lat, edge_lon), reference_ids(edge_lat, edge_lon)
    )


def test_regular_grid_including_poles_and_antimeridian():
    lat, lon = np.meshgrid(np.arange(-90, 90.01, 1.5), np.arange(-180, 180.01, 1.5))
    np.testing.assert_array_equal(gs2.latlng_to_cell_id(lat, lon).ravel(), reference_ids(lat, lon))


def test_tokens_match_s2geometry_and_round_trip():
    lat, lon = uniform_sphere(2000, seed=3)
    leaves = gs2.latlng_to_cell_id(lat, lon)
    for level in (0, 1, 5, 17, 30):
        ids = gs2.cell_id_parent(leaves, level)
        tokens = gs2.cell_id_to_token(ids)
        assert tokens.tolist() == [s2.S2CellId(int(i)).ToToken() for i in ids.tolist()]
        np.testing.assert_array_equal(gs2.token_to_cell_id(tokens), ids)
    assert gs2.cell_id_to_token(np.array([0], dtype=np.uint64)).tolist() == ["X"]
    assert gs2.token_to_cell_id(["X"]).tolist() == [0]


def test_children_and_range_match_s2geometry():
    lat, lon = uniform_sphere(500, seed=4)
    leaves = gs2.latlng_to_cell_id(lat, lon)
    for level in (0, 3, 12, 29):
        ids = gs2.cell_id_parent(leaves, level)
        children = gs2.cell_id_children(ids)
        lo, hi = gs2.cell_id_range(ids)
        for cid, kids, a, b in zip(ids.tolist(), children.tolist(), lo.tolist(), hi.tolist()):
            cell = s2.S2CellId(cid)
            assert kids == [cell.child(k).id() for k in range(4)]
            assert (a, b) == (cell.range_min().id(), cell.range_max().id())
        assert (gs2.cell_id_level(children) == level + 1).all()
        np.testing.assert_array_equal(gs2.cell_id_parent(children[:, 2], level), ids)
        assert gs2.cell_id_contains(ids, leaves).all()


def test_face_cells_by_hand():
    # Face cells are face << 61 | 1 << 60; their tokens are '1', '3', ..., 'b'.
    ids = np.array([(f << 61) | (1 << 60) for f in range(6)], dtype=np.uint64)
    assert gs2.cell_id_to_token(ids).tolist() == ["1", "3", "5", "7", "9", "b"]
    assert gs2.cell_id_level(ids).tolist() == [0] * 6
    assert gs2.cell_id_face(ids).tolist() == list(range(6))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        gs2.latlng_to_cell_id([91.0], [0.0])
    with pytest.raises(ValueError, match="NaN"):
        gs2.latlng_to_cell_id([np.nan], [0.0])
    with pytest.raises(ValueError, match="'zz'"):
        gs2.token_to_cell_id(["zz"])
    with pytest.raises(ValueError, match="invalid S2 cell id"):
        gs2.cell_id_level(np.array([2], dtype=np.uint64))
    with pytest.raises(ValueError, match="level"):
        gs2.cell_id_parent(gs2.cell_id_parent(gs2.latlng_to_cell_id([1.0], [1.0]), 3), 5)
