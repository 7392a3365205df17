"""Partitions, the partitioner and the Geocells container, checked against s2geometry and hand-built cases."""

import numpy as np
import pytest
import s2geometry as s2

from geoswc.geocells import Geocells, Partition, S2Partitioner
from geoswc.geocells import s2 as gs2
from geoswc.geocells.io import read_coordinates


def s2_token(lat, lon, level):
    return s2.S2CellId(s2.S2LatLng.FromDegrees(lat, lon)).parent(level).ToToken()


def reference_leaves(lat, lon):
    return [s2.S2CellId(s2.S2LatLng.FromDegrees(a, b)) for a, b in zip(lat.tolist(), lon.tolist())]


def reference_labels(partition, lat, lon, leaves=None):
    """Per-point reference: walk the parents of each point's leaf cell until one is a partition cell."""
    by_id = {cid: k for k, cid in enumerate(int(c) for c in partition.cell_ids)}
    levels = sorted({s2.S2CellId(cid).level() for cid in by_id})
    out = []
    for leaf in leaves if leaves is not None else reference_leaves(lat, lon):
        label = -1
        for level in levels:
            label = by_id.get(leaf.parent(level).id(), -1)
            if label >= 0:
                break
        out.append(label)
    return np.array(out, dtype=np.int64)


def unit_vector(lat, lon):
    lat_rad, lon_rad = np.radians(lat), np.radians(lon)
    return np.stack(
        [np.cos(lat_rad) * np.cos(lon_rad), np.cos(lat_rad) * np.sin(lon_rad), np.sin(lat_rad)], -1
    )


def great_circle_km(lat1, lon1, lat2, lon2):
    p1, p2, dl = np.radians(lat1), np.radians(lat2), np.radians(lon2 - lon1)
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(h))


@pytest.fixture(scope="module")
def bundled_points(test_data):
    _, lat, lon = read_coordinates(test_data / "mp16_sample_3k.csv")
    return lat, lon


@pytest.fixture(scope="module")
def bundled_coarse(test_data):
    return Partition.load_csv(test_data / "geoestimation_cells_50_5000.csv")


# --- the published GeoEstimation partitions -------------------------------------------------------------


def test_bundled_coarse_partition_loads_and_assigns_like_s2geometry(bundled_coarse, bundled_points):
    lat, lon = bundled_points
    assert len(bundled_coarse) == 3298
    assert bundled_coarse.num_images == 4723695
    assert bundled_coarse.tokens[:3].tolist() == ["8744", "364", "89c6c74"]
    np.testing.assert_array_equal(bundled_coarse.assign(lat, lon), reference_labels(bundled_coarse, lat, lon))


def test_save_csv_reproduces_the_published_file(bundled_coarse, test_data, tmp_path):
    out = bundled_coarse.save_csv(tmp_path / "cells.csv")
    published = (test_data / "geoestimation_cells_50_5000.csv").read_text().replace("\r\n", "\n")
    assert out.read_text() == published


@pytest.fixture(scope="module")
def sample_100k(shared_reference):
    _, lat, lon = read_coordinates(shared_reference / "coordinates" / "mp16_sample_100k.csv")
    return lat, lon, reference_leaves(lat, lon)


@pytest.mark.slow
@pytest.mark.parametrize("max_images", [5000, 2000, 1000])
def test_published_partitions_assign_100k_like_s2geometry(shared_reference, sample_100k, max_images):
    partition = Partition.load_csv(shared_reference / "cells" / f"geoestimation_cells_50_{max_images}.csv")
    lat, lon, leaves = sample_100k
    labels = partition.assign(lat, lon)
    np.testing.assert_array_equal(labels, reference_labels(partition, lat, lon, leaves))
    # A 100k sample of the very photos the cells were built from: nearly all fall inside a cell.
    assert (labels >= 0).mean() > 0.95


def test_published_hierarchy_is_containment(shared_reference):
    files = [shared_reference / "cells" / f"geoestimation_cells_50_{m}.csv" for m in (1000, 5000, 2000)]
    geocells = Geocells.from_csvs(files)
    assert [len(p) for p in geocells.partitions] == [3298, 7202, 12893]
    h = geocells.hierarchy
    assert (h >= 0).all()
    np.testing.assert_array_equal(h[:, -1], np.arange(12893))
    rng = np.random.default_rng(0)
    for f in rng.choice(12893, 300, replace=False).tolist():
        fine = s2.S2CellId(int(geocells.fine.cell_ids[f]))
        for g in range(2):
            parent = s2.S2CellId(int(geocells.partitions[g].cell_ids[h[f, g]]))
            assert parent.contains(fine)


# --- the partitioner on hand-built points ---------------------------------------------------------------


def cluster(lat, lon, n, seed, spread=1e-3):
    rng = np.random.default_rng(seed)
    return lat + rng.uniform(-spread, spread, n), lon + rng.uniform(-spread, spread, n)


@pytest.fixture(scope="module")
def hand_points():
    # Paris and Berlin share S2 cells down to level 3 ('47c') and separate at level 4 ('47f' / '47b');
    # New York is alone in level-2 cell '89', Sydney and Cape Town hold too few photos.
    parts = {
        "paris": cluster(48.85, 2.35, 70, 0),
        "berlin": cluster(52.52, 13.40, 50, 1),
        "new_york": cluster(40.70, -74.00, 60, 2),
        "sydney": cluster(-33.90, 151.20, 30, 3),
        "cape_town": cluster(-33.92, 18.42, 1, 4),
    }
    lat = np.concatenate([p[0] for p in parts.values()])
    lon = np.concatenate([p[1] for p in parts.values()])
    return parts, lat, lon


def test_geoestimation_rule_on_hand_built_points(hand_points):
    parts, lat, lon = hand_points
    assert s2_token(48.85, 2.35, 3) == s2_token(52.52, 13.40, 3) == "47c"
    assert (s2_token(48.85, 2.35, 4), s2_token(52.52, 13.40, 4)) == ("47f", "47b")
    geocells = S2Partitioner(min_images=40, max_images=(100,), start_level=2).fit(lat, lon).geocells_
    part = geocells.fine
    assert part.name == "cells_40_100"
    # The level-2 cell '47' and its child '47c' hold 120 > 100 photos and are split; '89' (60) stays; Sydney
    # (30 <= 40) and Cape Town (1) are deleted.
    expected = {"89": 60, "47f": 70, "47b": 50}
    assert dict(zip(part.tokens.tolist(), part.counts.tolist())) == expected
    assert part.num_images == 211
    paris = part.tokens.tolist().index("47f")
    mean = unit_vector(*parts["paris"]).mean(axis=0)
    expected_center = np.degrees(
        [np.arctan2(mean[2], np.hypot(mean[0], mean[1])), np.arctan2(mean[1], mean[0])]
    )
    np.testing.assert_allclose(part.centers_deg[paris], expected_center, atol=1e-9)
    labels = part.assign(lat, lon)
    assert (labels[-31:] == -1).all()
    assert (labels[:70] == paris).all()


def test_several_granularities_and_hierarchy_on_hand_built_points(hand_points):
    _, lat, lon = hand_points
    geocells = S2Partitioner(min_images=40, max_images=(200, 100), start_level=2).fit(lat, lon).geocells_
    assert geocells.names == ["cells_40_200", "cells_40_100"]
    coarse, fine = geocells.partitions
    assert sorted(coarse.tokens.tolist()) == ["47", "89"]
    for f, row in enumerate(geocells.hierarchy.tolist()):
        assert coarse.tokens[row[0]] == fine.tokens[f][: len(coarse.tokens[row[0]])]
        assert row[1] == f
    np.testing.assert_array_equal(geocells.assign(lat, lon)[:, 0], coarse.assign(lat, lon))


def test_cell_straddling_the_antimeridian_gets_a_centre_near_180():
    # Longitude 180 is a cell edge at every level >= 1 (v = 0 on faces 2, 3 and 5), so the straddling cell
    # is face 3 itself; a plain mean of longitudes would put its centre near 0.
    lat = np.array([0.01, -0.01, 0.02, -0.02, 0.0, 0.0])
    lon = np.array([179.99, -179.99, 179.98, -179.98, 179.995, -179.995])
    part = S2Partitioner(min_images=1, max_images=(100,), start_level=0).fit(lat, lon).geocells_.fine
    assert part.tokens.tolist() == ["7"] and part.counts.tolist() == [6]
    assert abs(part.centers_deg[0, 1]) > 179.9
    assert abs(part.centers_deg[0, 0]) < 1e-9


def test_rules_counts_and_centres_on_real_points(bundled_points):
    lat, lon = bundled_points
    geocells = S2Partitioner(min_images=3, max_images=(60, 25, 10)).fit(lat, lon).geocells_
    labels = geocells.assign(lat, lon)
    leaves = gs2.latlng_to_cell_id(lat, lon)
    for g, (part, max_images) in enumerate(zip(geocells.partitions, (60, 25, 10))):
        assert (part.counts > 3).all() and (part.counts <= max_images).all()
        np.testing.assert_array_equal(
            np.bincount(labels[labels[:, g] >= 0, g], minlength=len(part)), part.counts
        )
        np.testing.assert_array_equal(part.assign(lat, lon), reference_labels(part, lat, lon))
        # Every cell's parent had more than max_images photos (that is why it was split), unless it is a
        # start cell.
        for k in np.flatnonzero(part.levels > 2)[:50].tolist():
            parent = gs2.cell_id_parent(part.cell_ids[k : k + 1], int(part.levels[k]) - 1)
            lo, hi = gs2.cell_id_range(parent)
            assert int(((leaves >= lo) & (leaves <= hi)).sum()) > max_images
        for k in range(0, len(part), max(1, len(part) // 20)):
            members = labels[:, g] == k
            mean = unit_vector(lat[members], lon[members]).mean(axis=0)
            center_xyz = unit_vector(*part.centers_deg[k])
            assert np.dot(center_xyz, mean / np.linalg.norm(mean)) > 1 - 1e-12
    assert geocells.partitions[0].counts.sum() >= geocells.partitions[-1].counts.sum()
    assert (geocells.hierarchy >= 0).all()


def test_target_rule_splits_the_most_populated_cell(bundled_points):
    lat, lon = bundled_points
    geocells = S2Partitioner(min_images=2, max_images=(), target_cells=150).fit(lat, lon).geocells_
    part = geocells.fine
    assert geocells.names == ["cells_2_n150"]
    assert 150 <= len(part) <= 152
    assert (part.counts > 2).all()
    np.testing.assert_array_equal(part.assign(lat, lon), reference_labels(part, lat, lon))
    # Greedy order: every split cell held at least as many photos as any cell left in the result.
    leaves = gs2.latlng_to_cell_id(lat, lon)
    for k in np.flatnonzero(part.levels > 2).tolist():
        parent = gs2.cell_id_parent(part.cell_ids[k : k + 1], int(part.levels[k]) - 1)
        lo, hi = gs2.cell_id_range(parent)
        assert int(((leaves >= lo) & (leaves <= hi)).sum()) >= part.counts.max()


def test_target_and_max_rules_combined(bundled_points):
    lat, lon = bundled_points
    geocells = S2Partitioner(min_images=2, max_images=(200,), target_cells=300).fit(lat, lon).geocells_
    assert geocells.names[-1] == "cells_2_n300"
    assert len(geocells.partitions[0]) < len(geocells.fine)


# --- assignment, files, fingerprints --------------------------------------------------------------------


def test_nearest_assignment_uses_great_circle_distance(bundled_coarse):
    # Points in the South Pacific and at the South Pole: no photo cell contains them.
    lat = np.array([-48.0, -89.9, -60.0])
    lon = np.array([-130.0, 10.0, 170.0])
    assert (bundled_coarse.assign(lat, lon) == -1).all()
    nearest = bundled_coarse.assign(lat, lon, nearest=True)
    centers = bundled_coarse.centers_deg
    for a, b, k in zip(lat, lon, nearest):
        assert k == np.argmin(great_circle_km(a, b, centers[:, 0], centers[:, 1]))


def test_geocells_save_load_round_trip(bundled_points, tmp_path):
    lat, lon = bundled_points
    geocells = S2Partitioner(min_images=3, max_images=(60, 25, 10)).fit(lat, lon).geocells_
    geocells.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cells_3_10.csv",
        "cells_3_25.csv",
        "cells_3_60.csv",
        "geocells.json",
        "hierarchy.csv",
    ]
    loaded = Geocells.load(tmp_path)
    assert loaded.fingerprint == geocells.fingerprint
    assert loaded.names == geocells.names
    np.testing.assert_array_equal(loaded.hierarchy, geocells.hierarchy)
    for a, b in zip(loaded.partitions, geocells.partitions):
        np.testing.assert_array_equal(a.cell_ids, b.cell_ids)
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_array_equal(a.centers_deg, b.centers_deg)
        assert a.num_images == b.num_images == len(lat)
    np.testing.assert_array_equal(loaded.assign(lat, lon), geocells.assign(lat, lon))


def test_fingerprint_changes_when_cells_change_and_load_detects_it(bundled_points, tmp_path):
    lat, lon = bundled_points
    geocells = S2Partitioner(min_images=3, max_images=(60, 25)).fit(lat, lon).geocells_
    other = S2Partitioner(min_images=4, max_images=(60, 25)).fit(lat, lon).geocells_
    assert geocells.fingerprint != other.fingerprint
    assert geocells.fine.fingerprint != geocells.partitions[0].fingerprint
    geocells.save(tmp_path / "a")
    # Swap in the fine file of a different partition: the recorded fingerprint no longer matches.
    other.fine.save_csv(tmp_path / "a" / "cells_3_25.csv")
    with pytest.raises(ValueError, match="fingerprint"):
        Geocells.load(tmp_path / "a")
    # Reordering the rows changes the class labels, hence the fingerprint.
    fine = geocells.fine
    order = np.arange(len(fine))[::-1]
    swapped = Partition(fine.cell_ids[order], counts=fine.counts[order], centers_deg=fine.centers_deg[order])
    assert swapped.fingerprint != fine.fingerprint


def test_hierarchy_without_containing_coarse_cell(tmp_path):
    # A coarse partition with one cell and a fine one with a cell elsewhere: -1, or the nearest coarse centre.
    ids = gs2.cell_id_parent(gs2.latlng_to_cell_id([10.0, -40.0, 60.0], [20.0, 100.0, 25.0]), 6)
    coarse = Partition(ids[[0, 2]], counts=[5, 5], centers_deg=[[10.0, 20.0], [60.0, 25.0]], name="coarse")
    fine_ids = np.concatenate([gs2.cell_id_children(ids[:1])[0, :2], ids[1:2]])
    fine = Partition(
        fine_ids, counts=[2, 3, 4], centers_deg=[[10.0, 20.0], [10.1, 20.1], [-40.0, 100.0]], name="fine"
    )
    assert Geocells([coarse, fine]).hierarchy.tolist() == [[0, 0], [0, 1], [-1, 2]]
    assert Geocells([coarse, fine], fallback="nearest").hierarchy.tolist() == [[0, 0], [0, 1], [0, 2]]
    with pytest.raises(ValueError, match="choose one of: none, nearest"):
        Geocells([coarse, fine], fallback="closest")


def test_bad_partitions_and_files_are_rejected(tmp_path):
    ids = gs2.cell_id_parent(gs2.latlng_to_cell_id([10.0], [20.0]), 5)
    child = gs2.cell_id_children(ids)[0, :1]
    with pytest.raises(ValueError, match="overlap"):
        Partition(np.concatenate([ids, child]), counts=[1, 1], centers_deg=[[0, 0], [0, 0]])
    bad = tmp_path / "bad.csv"
    bad.write_text("class_label,hex_id\n0,47\n")
    with pytest.raises(ValueError, match="preamble"):
        Partition.load_csv(bad)
    bad.write_text(
        "num_images: 3\nmin_concept_probability: ---\nclass_label,hex_id,imgs_per_cell,latitude_mean,"
        "longitude_mean\n0,4g,3,1.0,2.0\n"
    )
    with pytest.raises(ValueError, match="'4g'"):
        Partition.load_csv(bad)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        Partition.load_csv(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="max_images 10 must be larger than min_images 50"):
        S2Partitioner(max_images=(10,)).fit([0.0], [0.0])
    with pytest.raises(ValueError, match="no cell holds more than min_images"):
        S2Partitioner().fit([0.0, 1.0], [0.0, 1.0])


def test_positions_find_cells_by_the_recorded_rule(tmp_path):
    """``containment`` (geoswc's S2 cells) is the S2 lookup; ``nearest_center`` (cells that are points, as the
    MvMF components of an imported model) the great-circle nearest centre, hand-checked here."""
    centres = np.array([[10.0, 20.0], [10.0, 21.0], [-33.9, 151.2]])
    leaves = gs2.latlng_to_cell_id(centres[:, 0], centres[:, 1])
    part = Partition(leaves, counts=[1, 1, 1], centers_deg=centres, name="points")
    lat, lon = np.array([10.1, 10.0, -30.0, 10.0]), np.array([20.2, 20.9, 150.0, 20.0])
    plain = Geocells([part])
    assert plain.position_rule == "containment"
    np.testing.assert_array_equal(plain.assign_positions(lat, lon), part.assign(lat, lon))
    assert (plain.assign_positions(lat[:3], lon[:3]) == -1).all()
    points = Geocells([part], settings={"position_to_cell": "nearest_center"})
    np.testing.assert_array_equal(points.assign_positions(lat, lon), [0, 1, 2, 0])
    # the rule survives a save and load; cells imported before the rule was recorded are points
    saved = Geocells.load(points.save(tmp_path / "cells"))
    assert saved.position_rule == "nearest_center"
    assert Geocells([part], settings={"import": {}}).position_rule == "nearest_center"
    with pytest.raises(ValueError, match="choose one of: containment, nearest_center"):
        Geocells([part], settings={"position_to_cell": "voronoi"}).assign_positions(lat, lon)
