"""`geoswc.data.photos`: photos of mixed shapes batched by shape, unreadable files as errors.

The evaluation transform resizes the longest side (``eval_resize="longest"``), so a landscape, a portrait and
a panorama come out with different shapes; a batch must hold one shape only, every photo must come out exactly
once, and a photo's pixels must not depend on the batch it lands in. Shapes are checked against the resize
computed by hand from each photo's upright size.
"""

import pytest
import torch

from geoswc.data.photos import batch_by_shape, group_by_shape, photo_batches, photo_loader, PhotoDataset
from geoswc.data.transforms import build_transform
from photo_fixtures import make_mixed_photos, make_unreadable_files

SIZE = 32
DATA_CONFIG = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
# Substrings of the reason each unreadable file must give (lower case).
REASONS = {"corrupt": "jpeg", "empty": "empty", "missing": "not found", "text": "not a recognised image"}


def longest_side_shape(width, height, size=SIZE):
    """``(3, H, W)`` of a ``width x height`` photo whose longest side is resized to ``size``
    (`ResizeLongest`: the other side is ``round(side * size / longest)``, at least 1)."""
    longest = max(width, height)
    return 3, max(1, round(height * size / longest)), max(1, round(width * size / longest))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_mixed_photos(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_unreadable_files(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def sources(photos, bad_files):
    """The photos with the unreadable files interleaved: ``(paths, {index: name}, {index: kind})``."""
    good = sorted(photos)
    bad = sorted(bad_files)
    paths, good_at, bad_at = [], {}, {}
    for i, name in enumerate(good):
        good_at[len(paths)] = name
        paths.append(photos[name].path)
        if i % 2 == 1 and bad:
            kind = bad.pop(0)
            bad_at[len(paths)] = kind
            paths.append(bad_files[kind])
    for kind in bad:
        bad_at[len(paths)] = kind
        paths.append(bad_files[kind])
    return paths, good_at, bad_at


@pytest.fixture(scope="module")
def longest_transform():
    return build_transform(DATA_CONFIG, train=False, size=SIZE, eval_resize="longest")


@pytest.fixture(scope="module")
def dataset(sources, longest_transform):
    return PhotoDataset(sources[0], longest_transform)


def collect(batches):
    return [(batch.indices.tolist(), batch.pixels, dict(batch.errors)) for batch in batches]


@pytest.fixture(
    scope="module",
    params=[(b, w) for b in (1, 3, 32) for w in (0, 2)],
    ids=lambda p: f"batch{p[0]}-workers{p[1]}",
)
def run(request, dataset):
    """``(batch_size, [(indices, pixels, errors)])`` of one pass of `photo_batches` over the mixed sources."""
    batch_size, workers = request.param
    return batch_size, collect(photo_batches(dataset, batch_size=batch_size, workers=workers))


def test_hand_computed_shapes(photos):
    # The rule spelled out on the photos whose sides are not a multiple of the scale.
    assert longest_side_shape(*photos["panorama.jpg"].size) == (3, 8, 32)
    assert longest_side_shape(*photos["thumbnail.jpg"].size) == (3, 24, 32)  # upsampled
    assert longest_side_shape(*photos["rotated.jpg"].size) == (3, 32, 20)
    assert longest_side_shape(*photos["tall.png"].size) == (3, 32, 21)  # 30 * 32 / 45 = 21.3
    assert longest_side_shape(*photos["wide.webp"].size) == (3, 14, 32)  # 30 * 32 / 70 = 13.7
    assert longest_side_shape(*photos["slim.webp"].size) == (3, 32, 19)  # 36 * 32 / 60 = 19.2
    assert longest_side_shape(1000, 10) == (3, 1, 32)  # never 0


def test_every_photo_comes_out_exactly_once(run, sources):
    _, good_at, bad_at = sources
    _, batches = run
    indices = [i for batch_indices, _, _ in batches for i in batch_indices]
    errors = [i for _, _, batch_errors in batches for i in batch_errors]
    assert len(indices) == len(set(indices)), "a photo came out twice"
    assert len(errors) == len(set(errors)), "an error came out twice"
    assert sorted(indices) == sorted(good_at)
    assert sorted(errors) == sorted(bad_at)


def test_each_batch_has_one_shape_and_at_most_batch_size_photos(run, photos, sources):
    _, good_at, _ = sources
    batch_size, batches = run
    for batch_indices, pixels, _ in batches:
        if not batch_indices:
            assert pixels is None
            continue
        assert pixels.ndim == 4 and len(pixels) == len(batch_indices) <= batch_size
        shapes = {longest_side_shape(*photos[good_at[i]].size) for i in batch_indices}
        assert shapes == {tuple(pixels.shape[1:])}, [good_at[i] for i in batch_indices]


def test_batches_are_full_whenever_the_photos_allow(run, photos, sources):
    # Fewer than 4 * batch_size photos never wait here, so only the last batch of a shape can be short.
    _, good_at, _ = sources
    batch_size, batches = run
    short = [
        tuple(pixels.shape[1:])
        for batch_indices, pixels, _ in batches
        if batch_indices and len(batch_indices) < batch_size
    ]
    assert len(short) == len(set(short)), f"two short batches of one shape: {short}"
    shapes = {longest_side_shape(*info.size) for info in photos.values()}
    assert len(short) <= len(shapes)


def test_shapes_are_the_longest_side_resize_of_the_upright_photo(run, photos, sources):
    _, good_at, _ = sources
    _, batches = run
    seen = {}
    for batch_indices, pixels, _ in batches:
        for i in batch_indices:
            seen[good_at[i]] = tuple(pixels.shape[1:])
    assert seen == {name: longest_side_shape(*info.size) for name, info in photos.items()}


def test_exif_rotated_photo_comes_out_portrait(run, photos, sources):
    _, good_at, _ = sources
    _, batches = run
    (rotated,) = [i for i, name in good_at.items() if name == "rotated.jpg"]
    stored_width, stored_height = photos["rotated.jpg"].stored
    assert stored_width > stored_height  # the file itself is landscape
    for batch_indices, pixels, _ in batches:
        if rotated in batch_indices:
            _, height, width = pixels.shape[1:]
            assert (height, width) == (32, 20)
            break
    else:
        pytest.fail("the EXIF-rotated photo did not come out")


def test_unreadable_files_are_errors_with_a_reason(run, sources):
    _, _, bad_at = sources
    _, batches = run
    errors = {}
    for _, _, batch_errors in batches:
        errors.update(batch_errors)
    assert set(errors) == set(bad_at)
    for index, kind in bad_at.items():
        reason = errors[index]
        assert isinstance(reason, str) and "\n" not in reason
        assert REASONS[kind] in reason.lower(), f"{kind}: {reason!r}"


def test_pixels_do_not_depend_on_the_batch(run, dataset):
    _, batches = run
    for batch_indices, pixels, _ in batches:
        for row, i in enumerate(batch_indices):
            index, alone, error = dataset[i]
            assert index == i and error is None
            assert torch.equal(pixels[row], alone), f"photo {i} differs inside its batch"


def test_dataset_items(dataset, sources):
    _, good_at, bad_at = sources
    assert len(dataset) == len(good_at) + len(bad_at)
    for i in range(len(dataset)):
        index, pixels, error = dataset[i]
        assert index == i
        if i in good_at:
            assert error is None and pixels.dtype == torch.float32 and pixels.ndim == 3
        else:
            assert pixels is None and error
            assert dataset.describe(i).endswith(".jpg")


@pytest.mark.parametrize("max_pending", [0, 1, 2])
@pytest.mark.parametrize("batch_size", [2, 4])
def test_batch_by_shape_with_little_room_still_yields_everything_once(
    dataset, sources, photos, batch_size, max_pending
):
    _, good_at, bad_at = sources
    loader = photo_loader(dataset, batch_size=batch_size)
    indices, errors = [], []
    for batch in batch_by_shape(loader, batch_size, max_pending=max_pending):
        errors.extend(batch.errors)
        if len(batch) == 0:
            assert batch.pixels is None
            continue
        assert len(batch.pixels) == len(batch) <= batch_size
        names = [good_at[i] for i in batch.indices.tolist()]
        assert {longest_side_shape(*photos[n].size) for n in names} == {tuple(batch.pixels.shape[1:])}
        indices.extend(batch.indices.tolist())
    assert sorted(indices) == sorted(good_at) and len(indices) == len(set(indices))
    assert sorted(errors) == sorted(bad_at)


def test_batch_by_shape_on_hand_made_groups():
    # Shapes A, B, A, C, A, B arriving in chunks of two; errors pass through at once.
    shape = {"A": (3, 4, 8), "B": (3, 8, 4), "C": (3, 5, 5)}
    order = "ABACAB"
    items = [(i, torch.full(shape[s], float(i)), None) for i, s in enumerate(order)]
    items.insert(3, (6, None, "empty file"))
    chunks = [group_by_shape(items[k : k + 2]) for k in range(0, len(items), 2)]
    first_groups, first_errors = chunks[0]
    assert [g[0].tolist() for g in first_groups] == [[0], [1]] and first_errors == {}
    out = list(batch_by_shape(chunks, 2, max_pending=1))
    got = [i for b in out for i in b.indices.tolist()]
    assert sorted(got) == list(range(len(order)))
    assert [b.errors for b in out if b.errors] == [{6: "empty file"}]
    for b in out:
        if len(b):
            assert len({order[i] for i in b.indices.tolist()}) == 1 and len(b) <= 2
            for row, i in enumerate(b.indices.tolist()):
                assert torch.equal(b.pixels[row], torch.full(shape[order[i]], float(i)))
    with pytest.raises(ValueError, match="batch_size"):
        list(batch_by_shape(chunks, 0))


def test_indices_select_and_order_the_photos(dataset, sources):
    _, good_at, bad_at = sources
    chosen = [sorted(good_at)[4], sorted(bad_at)[0], sorted(good_at)[0], sorted(good_at)[2]]
    got, errors = [], []
    for batch in photo_batches(dataset, batch_size=32, indices=chosen):
        got.extend(batch.indices.tolist())
        errors.extend(batch.errors)
    assert sorted(got) == sorted(i for i in chosen if i in good_at)
    assert errors == [sorted(bad_at)[0]]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 32])
def test_fixed_size_gives_full_batches_in_input_order(sources, batch_size, workers):
    paths, good_at, bad_at = sources
    transform = build_transform(DATA_CONFIG, train=False, size=SIZE, eval_resize="fixed")
    dataset = PhotoDataset(paths, transform)
    batches = list(photo_batches(dataset, batch_size=batch_size, workers=workers))
    full = [b for b in batches if len(b)]
    assert [i for b in full for i in b.indices.tolist()] == sorted(good_at)
    assert all(len(b) == batch_size for b in full[:-1])
    assert 1 <= len(full[-1]) <= batch_size
    assert all(tuple(b.pixels.shape[1:]) == (3, SIZE, SIZE) for b in full)
    assert sorted(i for b in batches for i in b.errors) == sorted(bad_at)
    for b in full:
        for row, i in enumerate(b.indices.tolist()):
            assert torch.equal(b.pixels[row], dataset[i][1])


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 2, "workers": -1}])
def test_bad_loader_settings_are_refused(dataset, kwargs):
    with pytest.raises(ValueError):
        photo_loader(dataset, **kwargs)
