"""The json codec's whole-poll route: the same examples as record by record, and never more lenient."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
