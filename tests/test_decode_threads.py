"""`geoswc.data.threads`: decoding in threads gives the batches of the decoding in the main process (same
photos, same order, same pixels, same errors), and refuses bad settings."""

import threading
import time

import pytest
import torch

from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.data.threads import DecodeSizing, threaded_groups, threaded_photo_batches
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


def test_measured_threads_give_the_batches_of_the_main_process(dataset):
    expected = collect(photo_batches(dataset, batch_size=2, workers=0))
    sizing = DecodeSizing(limit=3)
    got = collect(threaded_photo_batches(dataset, batch_size=2, threads=None, sizing=sizing))
    assert [(i, e) for i, _, e in got] == [(i, e) for i, _, e in expected]
    for (_, pixels, _), (_, reference, _) in zip(got, expected):
        assert (pixels is None and reference is None) or torch.equal(pixels, reference)
    assert sizing.chosen and all(1 <= n <= 3 for n in sizing.chosen)


@pytest.mark.parametrize(
    "decode, consume, limit, expected",
    [(0.3, 0.1, 8, 3), (0.3, 0.1, 2, 2), (0.05, 0.2, 8, 1), (0.25, 0.1, 8, 3), (None, None, 8, 1)],
)
def test_sizing_keeps_the_consumer_fed(decode, consume, limit, expected):
    sizing = DecodeSizing(limit)
    if decode is not None:
        for _ in range(4):  # averages: four equal records give the same ratio
            sizing.record_decode(decode)
            sizing.record_consume(consume)
    assert sizing.threads() == expected
    assert list(sizing.chosen) == [expected]


class _Recording:
    """A dataset whose items take ``delay`` seconds and record the thread that decoded them."""

    def __init__(self, n, delay=0.0):
        self.n, self.delay, self.threads = n, delay, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return i, None, f"unreadable {i}"  # an item as PhotoDataset gives for a file it cannot read


def _indices(group):
    return sorted(group[1])  # group_by_shape's (groups, errors): the errors are keyed by index


def test_one_chunk_is_decoded_without_a_pool():
    data = _Recording(3)
    assert [_indices(g) for g in threaded_groups(data, batch_size=8, threads=None)] == [[0, 1, 2]]
    assert set(data.threads) == {threading.current_thread().name}


def test_slow_decoding_gets_more_threads_and_a_slow_consumer_one():
    slow_decode = DecodeSizing(limit=4)
    data = _Recording(24, delay=0.03)
    out = [_indices(g) for g in threaded_groups(data, batch_size=2, threads=None, sizing=slow_decode)]
    assert out == [[2 * i, 2 * i + 1] for i in range(12)]
    assert max(slow_decode.chosen) > 1
    assert any(name.startswith("geoswc-decode") for name in data.threads)

    slow_consumer = DecodeSizing(limit=4)
    for _ in threaded_groups(_Recording(12), batch_size=2, threads=None, sizing=slow_consumer):
        time.sleep(0.03)
    assert slow_consumer.chosen[-1] == 1
