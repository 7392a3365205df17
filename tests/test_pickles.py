"""The restricted unpickler (geoswc.data.pickles): plain data in, every global other than numpy's numeric scalars
refused, nothing executed."""

import os
import pickle

import numpy as np
import pytest

from geoswc.data.pickles import load_plain_pickle, loads_plain_pickle


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Plain:
    pass


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_containers_round_trip(tmp_path, protocol):
    data = {
        0: {1, 2, 3},
        7: frozenset({4}),
        "key": [1.5, -2, None, True, False, "text", b"\x00\xff", (1, (2, 3))],
        (1, 2): {"nested": [3 + 4j, 10**30]},
    }
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_plain_pickle(path) == data


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_numeric_scalars(tmp_path, protocol):
    # the form of the authors' initial_mu_kappa.pkl: a list of (lat, lon) tuples of numpy float64
    data = [(np.float64(36.975371283919), np.float64(-122.02778357932)), (np.int64(3), np.float32(0.5))]
    loaded = loads_plain_pickle(pickle.dumps(data, protocol=protocol))
    assert loaded == data
    assert type(loaded[0][0]) is np.float64 and loaded[0][0] == 36.975371283919
    assert type(loaded[1][1]) is np.float32


def test_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"a": _RunsShell(marker)}))
    with pytest.raises(ValueError) as err:
        load_plain_pickle(path)
    message = str(err.value)
    assert str(path) in message
    assert "os.system" in message or "posix.system" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, refused",
    [
        (_Plain(), "_Plain"),
        (np.arange(3), "numpy"),  # arrays are not scalars: refused
        (np.dtype([("a", "f8")]), "numpy.dtype"),  # a structured dtype is not a numeric one
    ],
)
def test_other_objects_are_refused(value, refused):
    with pytest.raises(ValueError, match=refused):
        loads_plain_pickle(pickle.dumps(value, protocol=4), source="crafted.pkl")


def test_object_dtype_scalar_is_refused():
    # a scalar of dtype object would rebuild an arbitrary object from its bytes
    payload = pickle.dumps(np.float64(1.0), protocol=2).replace(b"f8", b"O8")
    with pytest.raises(ValueError, match="crafted.pkl"):
        loads_plain_pickle(payload, source="crafted.pkl")


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({1: {2, 3}}, protocol=4)[:-3])
    with pytest.raises(ValueError, match="cut.pkl"):
        load_plain_pickle(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pkl"):
        load_plain_pickle(tmp_path / "nowhere.pkl")


@pytest.mark.shared
def test_the_authors_pickles(shared_reference):
    import pandas as pd

    data = shared_reference / "peers" / "visloc-estimation" / "data"
    assignments = load_plain_pickle(data / "cells_assignments.pkl")
    # ../shared/README.md: 26,406 components, 763,265 rows
    assert isinstance(assignments, dict) and len(assignments) == 26406
    rows = set().union(*assignments.values())
    assert sum(len(s) for s in assignments.values()) == len(rows) == 763265
    centres = load_plain_pickle(data / "initial_mu_kappa.pkl")
    reference = pd.read_csv(shared_reference / "cells" / "visloc_mvmf_centers_31145.csv")
    assert len(centres) == len(reference) == 31145
    np.testing.assert_array_equal(
        np.asarray(centres, dtype=np.float64), reference[["latitude_mean", "longitude_mean"]].to_numpy()
    )
