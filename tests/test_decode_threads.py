"""`geoswc.data.threads`: decoding in threads gives the batches of the decoding in the main process (same
photos, same order, same pixels, same errors), and refuses bad settings."""

import pytest
import torch

from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.data.threads import threaded_photo_batches
from geoswc.data.transforms import build_transform
from photo_fixtures import make_mixed_photos, make_unreadable_files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    photos = make_mixed_photos(tmp_path_factory.mktemp("mixed"))
    bad = make_unreadable_files(tmp_path_factory.mktemp("bad"))
    paths = [photos[name].path for name in sorted(photos)]
    # Unreadable files between the photos: their errors must come out as in the main-process path.
    for offset, kind in enumerate(sorted(bad)):
        paths.insert(2 * offset + 1, bad[kind])
    transform = build_transform(
        {"mean": (0.5,) * 3, "std": (0.5,) * 3}, train=False, size=32, eval_resize="longest"
    )
    return PhotoDataset(paths, transform)


def collect(batches):
    return [(batch.indices.tolist(), batch.pixels, dict(batch.errors)) for batch in batches]


@pytest.mark.parametrize("batch_size, threads", [(1, 1), (3, 2), (32, 3)])
def test_threads_give_the_batches_of_the_main_process(dataset, batch_size, threads):
    expected = collect(photo_batches(dataset, batch_size=batch_size, workers=0))
    got = collect(threaded_photo_batches(dataset, batch_size=batch_size, threads=threads))
    assert [(i, e) for i, _, e in got] == [(i, e) for i, _, e in expected]
    assert any(e for _, _, e in expected)  # the unreadable files are there
    for (_, pixels, _), (_, reference, _) in zip(got, expected):
        assert (pixels is None and reference is None) or torch.equal(pixels, reference)


def test_indices_select_and_order_the_photos(dataset):
    chosen = [5, 0, 3]
    expected = collect(photo_batches(dataset, batch_size=2, indices=chosen))
    got = collect(threaded_photo_batches(dataset, batch_size=2, threads=2, indices=chosen))
    assert [(i, e) for i, _, e in got] == [(i, e) for i, _, e in expected]


@pytest.mark.parametrize(
    "kwargs, message", [({"threads": 0}, "threads must be >= 1"), ({"batch_size": 0}, "batch_size")]
)
def test_bad_settings_are_refused(dataset, kwargs, message):
    settings = {"batch_size": 2, "threads": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        list(threaded_photo_batches(dataset, **settings))
