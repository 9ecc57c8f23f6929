"""Damage injection (stream.damage): each kind does what a broken upstream does, where it is placed."""

from __future__ import annotations

import numpy as np
import pytest

from continuity.stream.damage import DAMAGE_KINDS, SCALE, damage_scenario
from continuity.stream.scenarios import make_scenario


@pytest.fixture(scope="module")
def clean():
    return make_scenario("permuted-digits", segments=3, seed=0)


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_a_damaged_segment_replaces_its_slot_marks_every_example_and_keeps_true_test_labels(clean, kind):
    damaged = damage_scenario(clean, kind, at=2, source=0)
    segment = damaged.segments[2]
    assert segment.poisoned and segment.name == f"perm-0-{kind}"
    assert len(segment.train_y) == len(clean.segments[2].train_y) and segment.damaged.all()
    np.testing.assert_array_equal(segment.test_y, clean.segments[2].test_y)  # scored on the truth
    assert damaged.segments[:2] == clean.segments[:2]  # the segments before it are untouched
    assert not segment.train_x.flags.writeable and not segment.damaged.flags.writeable


def test_label_damage_corrupts_labels_on_the_source_segments_inputs(clean):
    source = clean.segments[0]
    known = {x.tobytes(): y for x, y in zip(source.train_x, source.train_y)}

    def truth(segment):
        return np.array([known[x.tobytes()] for x in segment.train_x])

    shuffled = damage_scenario(clean, "shuffle", at=2).segments[2]
    true = truth(shuffled)  # every input is one of the source segment's
    assert np.mean(shuffled.train_y == true) < 0.2
    assert sorted(shuffled.train_y) == sorted(true)  # the same labels, mixed up
    permuted = damage_scenario(clean, "permute", at=2).segments[2]
    np.testing.assert_array_equal(permuted.train_y, (truth(permuted) + 1) % 10)
    constant = damage_scenario(clean, "constant", at=2).segments[2]
    assert len(np.unique(constant.train_y)) == 1
    one_class = damage_scenario(clean, "one-class", at=2).segments[2]
    assert len(np.unique(one_class.train_y)) == 1
    np.testing.assert_array_equal(one_class.train_y, truth(one_class))  # right labels, one class only


def test_feature_damage_keeps_labels_and_breaks_features(clean):
    scaled = damage_scenario(clean, "scale", at=2).segments[2]
    assert scaled.train_x.max() == pytest.approx(SCALE)
    assert not damage_scenario(clean, "zero", at=2).segments[2].train_x.any()
    frozen = damage_scenario(clean, "freeze", at=2).segments[2]
    assert len(np.unique(frozen.train_x.reshape(len(frozen.train_x), -1), axis=0)) == 1
    assert len(np.unique(frozen.train_y)) > 1  # the labels still vary
    repeated = damage_scenario(clean, "repeat", at=2).segments[2]
    assert len(np.unique(repeated.train_x.reshape(len(repeated.train_x), -1), axis=0)) == 1
    assert len(np.unique(repeated.train_y)) == 1


def test_a_burst_is_inserted_in_the_middle_of_its_segment_under_the_segments_name(clean):
    damaged = damage_scenario(clean, "constant", at=1, placement="burst", burst_examples=700)
    segment, original = damaged.segments[1], clean.segments[1]
    assert segment.name == original.name and not segment.poisoned
    assert len(segment.train_y) == len(original.train_y) + 700
    middle = len(original.train_y) // 2
    assert segment.damaged.sum() == 700 and segment.damaged[middle : middle + 700].all()
    clean_rows = ~segment.damaged
    np.testing.assert_array_equal(segment.train_x[clean_rows], original.train_x)  # nothing clean is lost
    np.testing.assert_array_equal(segment.train_y[clean_rows], original.train_y)


def test_the_same_arguments_give_the_same_damage(clean):
    a = damage_scenario(clean, "shuffle", at=2, placement="burst")
    b = damage_scenario(clean, "shuffle", at=2, placement="burst")
    np.testing.assert_array_equal(a.segments[2].train_y, b.segments[2].train_y)
    np.testing.assert_array_equal(a.segments[2].train_x, b.segments[2].train_x)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"kind": "gremlins", "at": 2}, "damage kind must be one of"),
        ({"kind": "zero", "at": 2, "placement": "sideways"}, "damage placement must be one of"),
        ({"kind": "zero", "at": 3}, "`at` must be a segment index in [0, 2]"),
        ({"kind": "zero", "at": 1, "source": 1}, "`source` must be a segment before `at`=1"),
        ({"kind": "zero", "at": 1, "placement": "burst", "burst_examples": 0}, "`burst_examples` must be"),
    ],
)
def test_bad_arguments_are_errors_that_name_the_option(clean, arguments, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        damage_scenario(clean, **arguments)
