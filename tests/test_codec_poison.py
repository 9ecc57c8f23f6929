"""Poison pills: records that once crashed `serve` for good are dead letters, and their neighbours train."""

from __future__ import annotations

import json

import jax
import numpy as np
import orjson
import pytest

from continuity.factory import learner_for
from continuity.learner import Batch, LearnerConfig, ModelConfig
from continuity.stream import BinaryCodec, FeatureSpec, JsonCodec, PartitionRecords, encode_binary

SPEC = FeatureSpec((2, 2), "float32", 3)
REGRESSION = FeatureSpec((2, 2), "float32", None)
ROW = [[0.5, 0.25], [1.0, 2.0]]


def _records(values) -> PartitionRecords:
    offsets = np.arange(len(values), dtype=np.int64)
    return PartitionRecords("t", 0, list(values), [None] * len(values), offsets, offsets)


def _decode_between_good_ones(codec, poison: bytes):
    """Decode good, poison, good; return (the one dead letter, the block of the two good ones)."""
    good = [codec.encode(np.asarray(ROW, np.float32), y) for y in (np.int32(1), np.int32(2))]
    if codec.spec.num_classes is None:  # regression
        good = [codec.encode(np.asarray(ROW, np.float32), y) for y in (np.float32(1.5), np.float32(-2.0))]
    block, letters = codec.decode(_records([good[0], poison, good[1]]))
    assert [letter.record.position.offset for letter in letters] == [1]
    assert list(block.offsets) == [0, 2]
    return letters[0], block


# ---- the poison pills of issue 10, each of which crashed the decoder with its own exception


def test_x_nested_100000_deep_is_a_dead_letter_not_a_recursion_error():
    poison = b'{"y": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    letter, _ = _decode_between_good_ones(JsonCodec(SPEC), poison)
    assert letter.kind == "bad JSON" and "depth" in letter.reason


def test_x_nested_within_the_parsers_limit_but_beyond_any_shape_is_a_dead_letter():
    poison = b'{"y": 1, "x": ' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}"
    letter, _ = _decode_between_good_ones(JsonCodec(SPEC), poison)
    assert letter.kind == "bad shape"


def test_a_400_digit_integer_in_x_is_a_dead_letter_not_an_overflow_error():
    poison = b'{"y": 1, "x": [1, 2, 3, ' + b"9" * 400 + b"]}"
    letter, _ = _decode_between_good_ones(JsonCodec(SPEC), poison)
    assert letter.kind == "bad JSON"


def test_a_400_digit_regression_target_is_a_dead_letter_not_an_overflow_error():
    poison = b'{"x": [1, 2, 3, 4], "y": ' + b"9" * 400 + b"}"
    letter, block = _decode_between_good_ones(JsonCodec(REGRESSION), poison)
    assert letter.kind == "bad JSON"
    assert block.y.tolist() == [1.5, -2.0]


def test_a_lone_surrogate_in_the_key_or_segment_is_a_dead_letter_not_a_unicode_error():
    for field in ("key", "segment"):
        poison = b'{"x": [1, 2, 3, 4], "y": 1, "' + field.encode() + b'": "\\udfff"}'
        letter, _ = _decode_between_good_ones(JsonCodec(SPEC), poison)
        assert letter.kind == "bad JSON" and "surrogate" in letter.reason


# ---- values that are finite on the wire but not in float32, the dtype they are trained in


def test_1e300_in_json_x_is_a_dead_letter():
    letter, _ = _decode_between_good_ones(JsonCodec(SPEC), b'{"x": [1, 2, 3, 1e300], "y": 1}')
    assert letter.kind == "non-finite" and "float32" in letter.reason


def test_a_regression_target_beyond_float32_is_a_dead_letter():
    for target in (b"1e300", b"-1e39", b"3.5e38"):
        letter, _ = _decode_between_good_ones(JsonCodec(REGRESSION), b'{"x": [1, 2, 3, 4], "y": ' + target + b"}")
        assert letter.kind == "non-finite", target


def test_1e300_in_a_float64_binary_record_is_a_dead_letter():
    codec = BinaryCodec(FeatureSpec((2, 2), "float64", 3))
    poison = encode_binary(np.array([[1.0, 2.0], [3.0, 1e300]]), np.int32(1), dtype="float64")
    letter, block = _decode_between_good_ones(codec, poison)
    assert letter.kind == "non-finite" and "float32" in letter.reason
    assert block.x.dtype == np.float32 and np.isfinite(block.x).all()


def test_inf_and_nan_in_a_float16_binary_record_are_dead_letters():
    codec = BinaryCodec(FeatureSpec((2, 2), "float16", 3))
    for bad in (np.inf, np.nan):
        poison = encode_binary(np.array([[1.0, 2.0], [3.0, bad]], np.float16), np.int32(1), dtype="float16")
        letter, _ = _decode_between_good_ones(codec, poison)
        assert letter.kind == "non-finite"


def test_a_binary_segment_or_key_that_is_not_strict_utf8_is_a_dead_letter():
    codec = BinaryCodec(SPEC)
    surrogate = "\udfff".encode("utf-8", "surrogatepass")  # b"\xed\xbf\xbf": UTF-8 forbids it
    for raw in (surrogate, b"\xff\xfe"):
        for field in ("segment", "key"):
            good = encode_binary(np.zeros((2, 2), np.float32), np.int32(1), **{field: "ABC"})
            poison = good.replace(b"\x03\x00ABC", b"\x03\x00" + raw.ljust(3, b"x"))
            letter, _ = _decode_between_good_ones(codec, poison)
            assert letter.kind == "bad bytes" and "UTF-8" in letter.reason, (raw, field)


def test_a_huge_string_among_multi_label_ids_is_quoted_by_its_start_not_copied_whole():
    spec = FeatureSpec((2, 2), "float32", 2, label_shape=(3,))
    codec = JsonCodec(spec)
    good = [json.dumps({"x": ROW, "y": [0, 1, 0]}).encode() for _ in range(2)]
    poison = json.dumps({"x": ROW, "y": [0, "x" * 10_000_000, 1]}).encode()
    block, letters = codec.decode(_records([good[0], poison, good[1]]))
    assert list(block.offsets) == [0, 2] and len(letters) == 1
    assert letters[0].reason.startswith("bad label: expected integer class ids, got 'xxxx")
    assert len(letters[0].reason) < 200, letters[0].reason[:300]


def test_a_nan_literal_is_bad_json():
    letter, _ = _decode_between_good_ones(JsonCodec(SPEC), b'{"x": [1, 2, 3, NaN], "y": 1}')
    assert letter.kind == "bad JSON"


def test_strings_and_booleans_are_not_numbers_in_x():
    for x in (["1", "2", "3", "4"], [True, False, True, False], [1, 2, 3, None]):
        letter, _ = _decode_between_good_ones(JsonCodec(SPEC), json.dumps({"x": x, "y": 1}).encode())
        assert letter.kind == "bad shape", x


def test_bytes_that_are_not_utf8_are_bad_bytes():
    letter, _ = _decode_between_good_ones(JsonCodec(SPEC), b'{"x": [1, 2, 3, 4], "y": 1, "key": "\xff"}')
    assert letter.kind == "bad bytes"


# ---- the claims about orjson the JSON decoder relies on, checked rather than assumed


def test_orjson_refuses_deep_nesting_huge_numbers_and_lone_surrogates_with_its_own_error():
    with pytest.raises(orjson.JSONDecodeError, match="depth"):
        orjson.loads(b"[" * 1025 + b"]" * 1025)
    orjson.loads(b"[" * 1024 + b"]" * 1024)  # the limit: 1,024 levels
    for text in (b"9" * 400, b"1e400", b"-" + b"9" * 400):
        with pytest.raises(orjson.JSONDecodeError, match="infinity"):
            orjson.loads(text)
    with pytest.raises(orjson.JSONDecodeError, match="surrogate"):
        orjson.loads(b'"\\udfff"')
    with pytest.raises(orjson.JSONDecodeError, match="UTF-8"):
        orjson.loads('"\udfff"'.encode("utf-8", "surrogatepass"))


def test_orjson_reads_integers_beyond_64_bits_as_floats_so_values_are_checked_after_the_cast():
    # Not a refusal, as one might assume: the decoder's float32 checks are what catch these.
    assert orjson.loads(b"18446744073709551615") == 2**64 - 1
    assert isinstance(orjson.loads(b"18446744073709551616"), float)
    assert isinstance(orjson.loads(b"-9223372036854775809"), float)


def test_good_json_records_decode_exactly_as_the_standard_library_reads_them():
    rng = np.random.default_rng(0)
    values, expected = [], []
    for _ in range(200):
        x = rng.standard_normal(4) * 10.0 ** rng.integers(-40, 38)
        x[0] = float(rng.integers(-(2**62), 2**62))  # big integers round once, as before
        text = json.dumps({"x": [int(x[0]), *x[1:].tolist()], "y": int(rng.integers(0, 3))})
        values.append(text.encode())
        expected.append(np.asarray(json.loads(text)["x"], np.float64).astype(np.float32))
    block, letters = JsonCodec(SPEC).decode(_records(values))
    assert letters == []
    np.testing.assert_array_equal(block.x.reshape(200, 4), np.asarray(expected))


# ---- one poison record costs nothing but itself


def test_a_1e300_record_is_dead_lettered_and_the_rest_of_its_batch_trains():
    codec = JsonCodec(SPEC)
    values = [json.dumps({"x": [1, 2, 3, 4], "y": i % 3}).encode() for i in range(7)]
    values.insert(3, b'{"x": [1, 2, 3, 1e300], "y": 1}')
    block, letters = codec.decode(_records(values))
    assert len(letters) == 1 and len(block) == 7
    rows = 8
    learner = learner_for(
        LearnerConfig(model=ModelConfig(hidden=(8,)), batch_size=rows),
        SPEC.shape,
        SPEC.num_classes,
    )
    x = np.zeros((rows, *SPEC.shape), np.float32)
    y = np.zeros(rows, np.int32)
    x[:7], y[:7] = block.x, block.y
    state = learner.init(0)
    before = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(state.params)]
    state, metrics = learner.train_step(state, Batch(x, y, np.arange(rows) < 7))
    assert bool(metrics["finite"]) and int(metrics["examples"]) == 7
    assert int(state.skipped_updates) == 0
    after = jax.tree.leaves(state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.slow  # the training loop over a recorded stream
def test_a_record_whose_loss_overflows_is_masked_and_counted_in_the_run_summary(tmp_path):
    # 3e38 is a finite float32, so the codec keeps it; the model's logits on it are not finite.
    from continuity.checkpoints import CheckpointStore
    from continuity.guard import GuardConfig
    from continuity.learner import ReplayConfig
    from continuity.loop import StreamInput, TrainingLoop
    from continuity.probe import ProbeConfig
    from continuity.service import format_summary
    from continuity.stream import FileSource, Holdout, MemoryDeadLetters, RecordingWriter

    spec = FeatureSpec((8, 8, 1), "float32", 10)
    codec = BinaryCodec(spec)
    rng = np.random.default_rng(0)
    x = rng.random((320, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 320).astype(np.int32)
    records = _records([codec.encode(x[i], y[i]) for i in range(320)])
    trained = np.flatnonzero(~Holdout(0.1).select(codec.decode(records)[0]))
    poisoned = int(trained[100])  # a record the loop trains on, not one it holds out for the probe
    x[poisoned] = 3e38
    records.values[poisoned] = codec.encode(x[poisoned], y[poisoned])
    writer = RecordingWriter(tmp_path / "stream.parquet")
    writer.write(records)
    writer.close()

    dead_letters = MemoryDeadLetters()
    stream = StreamInput(
        open_source=lambda positions: FileSource(tmp_path / "stream.parquet", start=positions),
        codec=codec,
        dead_letters=dead_letters,
        quarantine=MemoryDeadLetters(),
    )
    learner = learner_for(
        LearnerConfig(model=ModelConfig(hidden=(16,)), replay=ReplayConfig(capacity=64, batch_size=8)),
        spec.shape,
        spec.num_classes,
    )
    loop = TrainingLoop(
        stream,
        learner,
        CheckpointStore(tmp_path / "checkpoints"),
        probe=ProbeConfig(holdout_fraction=0.1),
        guard=GuardConfig(every_examples=10**6),
    )
    summary = loop.run()
    loop.store.close()
    assert dead_letters.total == 0
    assert summary.nonfinite_rows == 1 and summary.skipped_updates == 0
    assert summary.examples_trained == len(trained)  # counted as offered to the step, masked row included
    assert "non-finite rows (masked)" in format_summary(summary)
