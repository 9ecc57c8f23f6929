"""Synthetic scenarios: shapes, determinism, a leak-free split, each scenario's transform, poison."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import rotate

from continuity.stream.scenarios import POISON_MODES, REGRESSION_SCENARIOS, SCENARIOS, Segment, make_scenario


def base_images() -> np.ndarray:
    from continuity.stream.scenarios import _digits

    return _digits()[0]


def by_base_index(segment: Segment, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base indices, inputs, labels) of one split, sorted by base index."""
    index = getattr(segment, f"{split}_index")
    order = np.argsort(index)
    return index[order], getattr(segment, f"{split}_x")[order], getattr(segment, f"{split}_y")[order]


@pytest.mark.parametrize("name", SCENARIOS)
def test_segments_have_documented_shapes_dtypes_and_ranges(name):
    scenario = make_scenario(name)
    assert scenario.name == name and scenario.seed == 0
    assert scenario.num_classes == 10 and scenario.example_shape == (8, 8, 1)
    assert len(scenario.segments) == {"permuted-digits": 10, "rotated-digits": 5, "split-digits": 5}[name]
    for segment in scenario.segments:
        assert not segment.poisoned
        for x, y, index in (
            (segment.train_x, segment.train_y, segment.train_index),
            (segment.test_x, segment.test_y, segment.test_index),
        ):
            assert x.dtype == np.float32 and x.shape == (len(y), 8, 8, 1) and len(y) > 0
            assert y.dtype == np.int32 and index.shape == y.shape
            assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5
            assert y.min() >= 0 and y.max() < 10
            assert not x.flags.writeable and not y.flags.writeable


def test_segment_names():
    assert [s.name for s in make_scenario("permuted-digits", segments=3).segments] == ["perm-0", "perm-1", "perm-2"]
    assert [s.name for s in make_scenario("rotated-digits").segments] == [
        "rot-0",
        "rot-36",
        "rot-72",
        "rot-108",
        "rot-144",
    ]
    assert [s.name for s in make_scenario("split-digits").segments] == [
        "classes-0-1",
        "classes-2-3",
        "classes-4-5",
        "classes-6-7",
        "classes-8-9",
    ]


@pytest.mark.parametrize("name", SCENARIOS)
def test_same_arguments_give_identical_arrays(name):
    first, second = make_scenario(name, seed=3, poison=1), make_scenario(name, seed=3, poison=1)
    for a, b in zip(first.segments, second.segments):
        assert a.name == b.name
        for field in ("train_x", "train_y", "test_x", "test_y", "train_index", "test_index"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_different_seeds_differ():
    a, b = make_scenario("permuted-digits", seed=0, segments=2), make_scenario("permuted-digits", seed=1, segments=2)
    assert not np.array_equal(a.segments[0].test_index, b.segments[0].test_index)  # another split
    assert not np.array_equal(a.segments[0].train_index, b.segments[0].train_index)  # another order
    _, a_x, _ = by_base_index(a.segments[1], "test")
    _, b_x, _ = by_base_index(b.segments[1], "test")
    assert not np.array_equal(a_x[:10], b_x[:10])  # another permutation


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_test_image_is_ever_trained(name):
    scenario = make_scenario(name, poison=2)
    trained = np.concatenate([s.train_index for s in scenario.segments])
    tested = np.concatenate([s.test_index for s in scenario.segments])
    assert not np.intersect1d(trained, tested).size
    if name != "split-digits":  # one shared split: every segment sees all of it
        assert np.union1d(trained, tested).size == 1797
        for segment in scenario.segments:
            np.testing.assert_array_equal(np.sort(segment.train_index), np.sort(scenario.segments[0].train_index))


def test_split_is_stratified_by_class():
    segment = make_scenario("permuted-digits", segments=1, test_fraction=0.25).segments[0]
    train_counts = np.bincount(segment.train_y, minlength=10)
    test_counts = np.bincount(segment.test_y, minlength=10)
    share = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(share - 0.25) < 0.01)


def test_train_order_is_shuffled_within_a_segment():
    segment = make_scenario("permuted-digits", segments=1).segments[0]
    assert not np.all(np.diff(segment.train_index) > 0)
    assert np.all(np.diff(segment.test_index) > 0)  # tests stay in base order


def test_permuted_segments_permute_the_pixels_of_segment_zero():
    """Segment 0 is the base images; segment k moves whole pixel columns by one fixed permutation."""
    segments = make_scenario("permuted-digits", segments=4).segments
    index, x0, y0 = by_base_index(segments[0])
    np.testing.assert_array_equal(x0[..., 0], base_images()[index])
    pixels0 = x0.reshape(len(x0), 64)
    for segment in segments[1:]:
        index_k, xk, yk = by_base_index(segment)
        np.testing.assert_array_equal(index_k, index)
        np.testing.assert_array_equal(yk, y0)
        pixels_k = xk.reshape(len(xk), 64)
        # One permutation for all images: the pixel columns (one pixel across all images)
        # of segment k are those of segment 0, rearranged. (Some columns are identical,
        # e.g. corners that are blank in every image, so compare them as multisets.)
        assert sorted(c.tobytes() for c in pixels_k.T) == sorted(c.tobytes() for c in pixels0.T)
        assert not np.array_equal(pixels_k, pixels0)


def test_rotated_segments_rotate_the_base_images():
    segments = make_scenario("rotated-digits", segments=3).segments
    assert [s.name for s in segments] == ["rot-0", "rot-60", "rot-120"]
    index, x0, _ = by_base_index(segments[0], "test")
    np.testing.assert_array_equal(x0[..., 0], base_images()[index])
    _, x2, _ = by_base_index(segments[2], "test")
    expected = np.clip(rotate(base_images()[index], 120, axes=(1, 2), reshape=False, order=1), 0, 1)
    np.testing.assert_allclose(x2[..., 0], expected, atol=1e-6)


def test_split_segments_hold_exactly_their_class_pair():
    for k, segment in enumerate(make_scenario("split-digits").segments):
        assert set(np.unique(segment.train_y)) == {2 * k, 2 * k + 1}
        assert set(np.unique(segment.test_y)) == {2 * k, 2 * k + 1}
        index, x, y = by_base_index(segment)
        np.testing.assert_array_equal(x[..., 0], base_images()[index])  # untransformed


# --- poison ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("mode", POISON_MODES)
def test_poisoned_segment_repeats_the_source_distribution_with_corrupted_train_labels(name, mode):
    clean = make_scenario(name, seed=2)
    scenario = make_scenario(name, seed=2, poison=3, poison_source=1, poison_mode=mode)
    poisoned, source = scenario.segments[3], scenario.segments[1]
    assert poisoned.poisoned and poisoned.name == f"{source.name}-poisoned"
    assert [s.poisoned for s in scenario.segments].count(True) == 1
    # Inputs drawn like the source: same images, same transform, in an order of their own.
    index, x, corrupted = by_base_index(poisoned)
    source_index, source_x, truth = by_base_index(source)
    np.testing.assert_array_equal(index, source_index)
    np.testing.assert_array_equal(x, source_x)
    assert not np.array_equal(poisoned.train_index, source.train_index)
    # Test split: the same distribution with the true labels.
    for field in ("test_x", "test_y", "test_index"):
        np.testing.assert_array_equal(getattr(poisoned, field), getattr(source, field))
    if mode == "flip":
        assert np.all(corrupted != truth)
        assert set(np.unique(corrupted)) == set(np.unique(truth))
    else:
        np.testing.assert_array_equal(np.sort(corrupted), np.sort(truth))  # same label multiset
        assert np.mean(corrupted == truth) < 0.6
    # Every other segment is exactly the clean scenario's.
    for k, (a, b) in enumerate(zip(clean.segments, scenario.segments)):
        if k != 3:
            assert a.name == b.name
            np.testing.assert_array_equal(a.train_x, b.train_x)
            np.testing.assert_array_equal(a.train_y, b.train_y)


def test_flip_maps_each_label_to_the_next_of_its_set():
    pair = make_scenario("split-digits", poison=1, poison_mode="flip").segments[1]
    _, _, corrupted = by_base_index(pair)
    _, _, truth = by_base_index(make_scenario("split-digits").segments[0])
    np.testing.assert_array_equal(corrupted, 1 - truth)  # 0 -> 1, 1 -> 0
    digits = make_scenario("permuted-digits", segments=2, poison=1, poison_mode="flip").segments[1]
    _, _, corrupted = by_base_index(digits)
    _, _, truth = by_base_index(make_scenario("permuted-digits", segments=2).segments[0])
    np.testing.assert_array_equal(corrupted, (truth + 1) % 10)


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pieces"),
    [
        ({"name": "foo"}, ["scenario must be one of 'permuted-digits', 'rotated-digits', 'split-digits'", "'foo'"]),
        ({"name": "split-digits", "segments": 3}, ["segments", "None or 5", "Got 3"]),
        ({"name": "permuted-digits", "segments": 0}, ["segments", ">= 1", "Got 0"]),
        ({"name": "rotated-digits", "segments": 2.5}, ["segments", "Got 2.5"]),
        ({"name": "permuted-digits", "poison": 0}, ["poison", "[1, 9]", "Got 0"]),
        ({"name": "rotated-digits", "poison": 5}, ["poison", "[1, 4]", "Got 5"]),
        ({"name": "permuted-digits", "segments": 1, "poison": 1}, ["poison", "at least 2 segments", "Got poison=1"]),
        ({"name": "permuted-digits", "poison": 2, "poison_source": 2}, ["poison_source", "[0, 1]", "Got 2"]),
        ({"name": "permuted-digits", "poison_source": -1}, ["poison_source", "Got -1"]),
        ({"name": "split-digits", "poison": 1, "poison_mode": "swap"}, ["poison_mode", "'shuffle', 'flip'", "'swap'"]),
        ({"name": "split-digits", "test_fraction": 1.0}, ["test_fraction", "(0, 1)", "Got 1.0"]),
        ({"name": "split-digits", "test_fraction": 0}, ["test_fraction", "(0, 1)", "Got 0"]),
        ({"name": "split-digits", "seed": -1}, ["seed", "non-negative", "Got -1"]),
    ],
)
def test_bad_options_raise_a_value_error_naming_them(kwargs, pieces):
    name = kwargs.pop("name")
    with pytest.raises(ValueError) as error:
        make_scenario(name, **kwargs)
    for piece in pieces:
        assert piece in str(error.value)


# --- regression targets ------------------------------------------------------------------


def test_drifting_regression_has_float_targets_drifting_regions_and_is_seeded():
    scenario = make_scenario("drifting-regression", seed=1)
    assert scenario.name in REGRESSION_SCENARIOS and scenario.num_classes is None
    assert scenario.example_shape == (8,) and [s.name for s in scenario.segments] == [f"region-{k}" for k in range(4)]
    for segment in scenario.segments:
        for x, y in ((segment.train_x, segment.train_y), (segment.test_x, segment.test_y)):
            assert x.dtype == np.float32 and y.dtype == np.float32 and x.shape == (len(y), 8) and len(y) > 0
            assert np.all(np.isfinite(y)) and not x.flags.writeable and not y.flags.writeable
    centres = np.stack([s.train_x.mean(0) for s in scenario.segments])
    distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 1.0  # each segment is a region of its own
    again = make_scenario("drifting-regression", seed=1)
    for a, b in zip(scenario.segments, again.segments):
        np.testing.assert_array_equal(a.train_y, b.train_y)
    assert not np.array_equal(
        scenario.segments[0].train_y, make_scenario("drifting-regression", seed=2).segments[0].train_y
    )


def test_poisoned_regression_segment_reuses_an_earlier_region_with_corrupted_targets():
    """Both modes draw the same inputs: "flip" negates the true targets, "shuffle" permutes them."""
    clean = make_scenario("drifting-regression", seed=0)
    flipped, shuffled = (
        make_scenario("drifting-regression", seed=0, poison=3, poison_source=1, poison_mode=mode)
        for mode in ("flip", "shuffle")
    )
    source = clean.segments[1]
    for scenario in (flipped, shuffled):
        poisoned = scenario.segments[3]
        assert poisoned.poisoned and poisoned.name == "region-1-poisoned"
        assert np.linalg.norm(poisoned.train_x.mean(0) - source.train_x.mean(0)) < 0.2  # drawn like region 1
        assert abs(poisoned.test_y.mean() - source.test_y.mean()) < 0.3  # test targets stay true
        for k in (0, 1, 2):
            np.testing.assert_array_equal(clean.segments[k].train_y, scenario.segments[k].train_y)
    np.testing.assert_array_equal(flipped.segments[3].train_x, shuffled.segments[3].train_x)
    truth = -flipped.segments[3].train_y
    np.testing.assert_array_equal(np.sort(shuffled.segments[3].train_y), np.sort(truth))
    assert np.mean(shuffled.segments[3].train_y == truth) < 0.05
    assert abs(truth.mean() - source.train_y.mean()) < 0.3  # the true targets follow region 1's function
