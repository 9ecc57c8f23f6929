"""The json codec's whole-poll route: the same examples as record by record, and never more lenient."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from continuity.stream import FeatureSpec, encode_json, make_codec
from continuity.stream.records import PartitionRecords

SPEC = FeatureSpec((2, 3, 1), "float32", 10)


def _run(values: list[bytes]) -> PartitionRecords:
    n = len(values)
    return PartitionRecords("t", 0, values, [b"k"] * n, np.arange(n, dtype=np.int64), np.zeros(n, np.int64))


def _clean(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *SPEC.shape), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return x, y, [encode_json(x[i], int(y[i])) for i in range(n)]


def test_a_clean_poll_decodes_to_the_exact_float32_features_and_labels_written():
    x, y, values = _clean(50)
    assert b"0." in values[0] and len(values[0]) < 200  # float32 written as its shortest text
    block, letters = make_codec("json", SPEC).decode(_run(values))
    assert not letters
    np.testing.assert_array_equal(block.x, x)
    np.testing.assert_array_equal(block.y, y)
    assert block.keys == [b"k"] * 50 and block.segments == [None] * 50


def test_flat_lists_segments_and_keys_decode_alike_in_a_poll():
    x, y, _ = _clean(4)
    values = [
        json.dumps({"x": x[i].reshape(-1).tolist(), "y": int(y[i]), "segment": "s", "key": f"u{i}"}).encode()
        for i in range(4)
    ]
    block, letters = make_codec("json", SPEC).decode(_run(values))
    assert not letters
    np.testing.assert_array_equal(block.x, x)
    assert block.segments == ["s"] * 4 and block.keys == [b"u0", b"u1", b"u2", b"u3"]


@pytest.mark.parametrize(
    ("x", "reason"),
    [
        ([[[1.0], ["1.5"], [0.5]], [[0.1], [0.2], [0.3]]], "not a rectangular array of numbers"),
        ([[[1.0], [None], [0.5]], [[0.1], [0.2], [0.3]]], "not a rectangular array of numbers"),
        ([[[1.0], [0.5]], [[0.1], [0.2], [0.3], [0.4]]], "not a rectangular array"),
        ([[[1e300], [0.5], [0.5]], [[0.1], [0.2], [0.3]]], "non-finite"),
        ([1.0, 2.0], "bad shape"),
    ],
)
def test_one_bad_record_in_a_poll_is_dead_lettered_with_its_reason_and_the_rest_decode(x, reason):
    xs, ys, values = _clean(6)
    values[3] = json.dumps({"x": x, "y": 1}).encode()
    block, letters = make_codec("json", SPEC).decode(_run(values))
    assert [letter.record.position.offset for letter in letters] == [3]
    assert reason in letters[0].reason
    np.testing.assert_array_equal(block.x, np.delete(xs, 3, axis=0))
    assert block.offsets.tolist() == [0, 1, 2, 4, 5]


def _summary(decoded, drop_last: bool = False) -> tuple:
    """What a decode gave, comparable: dead letters (offset, reason), then x, y, offsets and keys."""
    block, letters = decoded
    end = len(block) - drop_last
    return (
        [(letter.record.position.offset, letter.reason) for letter in letters],
        block.x[:end].tolist(),
        block.y[:end].tolist(),
        block.offsets[:end].tolist(),
        block.keys[:end],
    )


def _decoded_one_by_one(values: list[bytes]) -> tuple:
    """`values` decoded in a poll that the compact parse cannot take (one more record carries a
    segment), so every record is parsed alone; that record's example is left out."""
    odd = encode_json(np.zeros(SPEC.shape, np.float32), 0, segment="odd")
    return _summary(make_codec("json", SPEC).decode(_run([*values, odd])), drop_last=True)


def test_a_compact_poll_decodes_exactly_as_its_records_parsed_one_by_one():
    x, y, values = _clean(40, seed=3)
    flat = [encode_json(x[i].reshape(-1), int(y[i])) for i in range(40)]
    for poll in (values, flat):
        assert _summary(make_codec("json", SPEC).decode(_run(poll))) == _decoded_one_by_one(poll)


@pytest.mark.parametrize(
    "x_text",
    [
        b"[[[01],[2],[3]],[[4],[5],[6]]]",  # a leading zero
        b"[[[1.],[2],[3]],[[4],[5],[6]]]",  # no digit after the point
        b"[[[.5],[2],[3]],[[4],[5],[6]]]",  # no digit before it
        b"[[[+1],[2],[3]],[[4],[5],[6]]]",  # a plus sign
        b"[[[1e],[2],[3]],[[4],[5],[6]]]",  # an exponent without digits
        b"[[[-],[2],[3]],[[4],[5],[6]]]",  # a sign alone
        b"[[[1-2],[2],[3]],[[4],[5],[6]]]",  # two numbers run together
        b"[[[],[2],[3]],[[4],[5],[6]]]",  # a number missing: ragged
        b"[[[1e999],[2],[3]],[[4],[5],[6]]]",  # beyond a double
        b"[[[%s],[2],[3]],[[4],[5],[6]]]" % (b"9" * 400),  # an integer beyond a double
    ],
)
def test_a_compact_record_whose_number_is_not_json_is_dead_lettered_and_the_rest_decode(x_text):
    x, y, values = _clean(5)
    values[2] = b'{"x":%s,"y":1}' % x_text
    decoded = make_codec("json", SPEC).decode(_run(values))
    assert _summary(decoded) == _decoded_one_by_one(values)
    block, letters = decoded
    assert [letter.record.position.offset for letter in letters] == [2]
    assert block.offsets.tolist() == [0, 1, 3, 4]
    np.testing.assert_array_equal(block.x, np.delete(x, 2, axis=0))


def test_a_compact_record_split_across_two_records_is_two_dead_letters_not_one_example():
    _, _, values = _clean(4)
    whole = values[1]
    cut = whole.index(b"],[") + 1
    values[1:2] = [whole[:cut], whole[cut:]]  # each half bad; together they would read as one record
    block, letters = make_codec("json", SPEC).decode(_run(values))
    assert [letter.record.position.offset for letter in letters] == [1, 2]
    assert block.offsets.tolist() == [0, 3, 4]


@pytest.mark.parametrize("x", [[True, 0.5, 1, 2, 3, 4], [[[1.0], [False], [0.5]], [[0.1], [0.2], [0.3]]]])
def test_a_boolean_among_numbers_in_x_is_a_dead_letter_not_a_one(x):
    _, _, values = _clean(3)
    values[1] = json.dumps({"x": x, "y": 1}).encode()
    block, letters = make_codec("json", SPEC).decode(_run(values))
    assert [letter.record.position.offset for letter in letters] == [1]
    assert letters[0].reason == "bad shape: x is not a rectangular array of numbers"
    assert block.offsets.tolist() == [0, 2]


number_texts = st.text(alphabet="0123456789.eE+-", min_size=0, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    numbers=st.lists(
        st.lists(st.one_of(number_texts, st.floats(-1e6, 1e6).map(repr)), min_size=6, max_size=6),
        min_size=1,
        max_size=5,
    ),
    labels=st.lists(st.one_of(st.integers(-2, 12).map(str), number_texts), min_size=5, max_size=5),
    flat=st.booleans(),
)
def test_compact_records_with_any_number_text_decode_as_parsed_one_by_one(numbers, labels, flat):
    values = []
    for row, label in zip(numbers, labels):
        cells = [text.encode() for text in row]
        if flat:
            x_text = b"[%s]" % b",".join(cells)
        else:
            x_text = b"[%s]" % b",".join(b"[%s]" % b",".join(b"[%s]" % c for c in cells[i : i + 3]) for i in (0, 3))
        values.append(b'{"x":%s,"y":%s}' % (x_text, label.encode()))
    assert _summary(make_codec("json", SPEC).decode(_run(values))) == _decoded_one_by_one(values)
