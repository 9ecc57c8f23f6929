"""Named-field JSON events: the feature spec, the `fields` codec, its checkpointed statistics, `inspect`.

The events are the drift streams' own (stream/drift.py: Agrawal's nine mixed attributes),
with a token list added here, so they carry numeric, categorical and token fields.
"""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from continuity.cli import main
from continuity.commands.inspect import draft_config
from continuity.config import ConfigError, load_config
from continuity.stream import FeatureSpec, Positions, RecordingWriter
from continuity.stream import fields as fields_module
from continuity.stream.drift import make_generator
from continuity.stream.fields import FieldsCodec, FieldSpec, FieldSpecError, stable_hash
from continuity.stream.records import PartitionRecords

TOPIC = "events"
WORDS = ("cheap", "fast", "loan", "house", "car", "rich", "poor", "young", "old", "city")

SPEC_TABLE = {
    "label": "label",
    "segment": "concept",
    "standardize_every": 16,
    "salary": {"kind": "numeric", "standardize": True},
    "commission": {"kind": "numeric", "standardize": True},
    "age": {"kind": "numeric", "standardize": True},
    "hvalue": {"kind": "numeric", "standardize": True},
    "hyears": {"kind": "numeric"},
    "loan": {"kind": "numeric", "standardize": True, "default": 0.0},
    "elevel": {"kind": "categorical", "vocabulary": [0, 1, 2, 3, 4]},
    "car": {"kind": "categorical", "buckets": 8, "encoding": "one_hot"},
    "zipcode": {"kind": "categorical", "buckets": 16},
    "words": {"kind": "tokens", "length": 4, "vocabulary": list(WORDS[:6]), "optional": True},
}


def events(n: int, seed: int = 0) -> list[dict]:
    """Agrawal events with a `words` token list (lengths 0..6, some words out of the vocabulary)."""
    rng = np.random.default_rng(seed)
    out = []
    for event in make_generator("agrawal").stream(max(n, 10), seed=seed).events(0, n):
        event["words"] = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(0, 7)))]
        out.append(event)
    return out


def run_of(values: list[bytes], first_offset: int = 0, partition: int = 0) -> PartitionRecords:
    n = len(values)
    offsets = np.arange(first_offset, first_offset + n, dtype=np.int64)
    return PartitionRecords(TOPIC, partition, list(values), [None] * n, offsets, np.zeros(n, np.int64))


def codec() -> FieldsCodec:
    return FieldsCodec(FieldSpec.from_dict(SPEC_TABLE), FeatureSpec((1,), "float32", 2))


def encoded(values: list[bytes], cuts: list[int], coder: FieldsCodec | None = None, start: int = 0) -> dict:
    """The features of `values` (offsets from `start`) decoded in polls cut at `cuts`, concatenated."""
    coder = coder or codec()
    parts = []
    bounds = [0, *cuts, len(values)]
    for a, b in zip(bounds, bounds[1:]):
        block, letters = coder.decode(run_of(values[a:b], start + a))
        assert not letters, letters[0].reason
        parts.append(block.x)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---------------------------------------------------------------------------- the spec


def test_the_spec_describes_the_model_inputs_it_produces_without_jax():
    spec = FieldSpec.from_dict(SPEC_TABLE)
    assert spec.inputs() == {
        "numeric": ((6,), "float32"),
        "elevel": ((), "int32"),
        "car": ((8,), "float32"),
        "zipcode": ((), "int32"),
        "words": ((4,), "int32"),
    }
    assert spec.vocabulary_sizes() == {"elevel": 6, "zipcode": 16, "words": 8}
    assert FieldSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"age": {"kind": "number"}}, "field 'age': `kind` must be one of"),
        ({"car": {"kind": "categorical"}}, "field 'car': give either `vocabulary`"),
        ({"car": {"kind": "categorical", "buckets": 8, "vocabulary": ["a"]}}, "field 'car': give either"),
        ({"words": {"kind": "tokens", "buckets": 10}}, "field 'words': `length` must be an integer >= 1"),
        ({"age": {"kind": "numeric", "scale": True}}, "field 'age': unknown key(s) ['scale']"),
        ({"age": {"kind": "numeric", "default": "old"}}, "field 'age': `default` must be a finite number"),
        ({"elevel": {"kind": "categorical", "vocabulary": [1, 1]}}, "field 'elevel': `vocabulary` lists a value twice"),
        ({"label": 3}, "`label` must name the label field"),
        ({"labels": "y"}, "unknown setting(s) ['labels']"),
        ({"concept": {"kind": "numeric"}}, "field 'concept': is the label, key or segment field"),
        ({"car": {"kind": "categorical", "buckets": 2**31}}, "field 'car': `buckets` must be at most 2147483647"),
        ({"words": {"kind": "tokens", "length": 2, "buckets": 10**20}}, "field 'words': `buckets` must be at most"),
    ],
)
def test_an_invalid_spec_is_an_error_naming_the_field_and_what_is_wrong(change, named):
    with pytest.raises(FieldSpecError) as raised:
        FieldSpec.from_dict({**SPEC_TABLE, **change})
    assert named in str(raised.value)


def test_an_invalid_spec_in_a_config_file_is_one_line_with_the_table_prefix(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[stream]\ncodec = "fields"\nnum_classes = 2\n[stream.fields]\nlabel = "y"\n[stream.fields.age]\nkind = "x"\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "\n" not in message and "[stream] fields: " in message and "field 'age': `kind` must be one of" in message
    path.write_text('[stream]\ncodec = "binary"\n[stream.fields]\nlabel = "y"\n[stream.fields.age]\nkind = "numeric"\n')
    with pytest.raises(ConfigError, match='codec: must be "fields" when a'):
        load_config(path)


def test_the_most_buckets_a_spec_allows_give_int32_ids_in_range():
    table = {**SPEC_TABLE, "zipcode": {"kind": "categorical", "buckets": 2**31 - 1}}
    table["words"] = {"kind": "tokens", "length": 4, "buckets": 2**31 - 1}
    coder = FieldsCodec(FieldSpec.from_dict(table), FeatureSpec((1,), "float32", 2))
    block, letters = coder.decode(run_of([orjson.dumps(e) for e in events(20)]))
    assert not letters and len(block) == 20
    assert (block.x["zipcode"] >= 0).all() and (block.x["words"] >= 0).all()


def test_a_config_with_a_spec_round_trips_through_its_toml_and_digests_the_spec(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[stream]\ncodec = "fields"\nnum_classes = 2\n' + _fields_toml(SPEC_TABLE))
    config = load_config(path)
    assert config.stream.field_spec() == FieldSpec.from_dict(SPEC_TABLE)
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml())
    assert load_config(again).stream.fields == config.stream.fields
    other = tmp_path / "other.toml"
    changed = {**SPEC_TABLE, "hyears": {"kind": "numeric", "standardize": True}}
    other.write_text('[stream]\ncodec = "fields"\nnum_classes = 2\n' + _fields_toml(changed))
    assert load_config(other).digest() != config.digest()


def _fields_toml(table: dict) -> str:
    from continuity.config import _fields_toml

    return "\n".join(_fields_toml(FieldSpec.from_dict(table).to_dict())) + "\n"


# ---------------------------------------------------------------------------- decoding


def test_events_decode_into_the_inputs_the_spec_describes_with_stable_ids():
    sample = events(64)
    block, letters = codec().decode(run_of([orjson.dumps(e) for e in sample]))
    assert not letters
    spec = FieldSpec.from_dict(SPEC_TABLE)
    for name, (shape, dtype) in spec.inputs().items():
        assert block.x[name].shape == (64, *shape) and block.x[name].dtype == dtype, name
    np.testing.assert_array_equal(block.y, [e["label"] for e in sample])
    assert block.segments == [e["concept"] for e in sample]
    np.testing.assert_array_equal(block.x["elevel"], [e["elevel"] for e in sample])  # vocabulary [0..4]: ids = values
    np.testing.assert_array_equal(block.x["car"].argmax(axis=1), [stable_hash(str(e["car"])) % 8 for e in sample])
    # BLAKE2b, never Python's salted hash(): the same id in every process.
    assert stable_hash("DE") == int.from_bytes(__import__("hashlib").blake2b(b"DE", digest_size=8).digest(), "little")
    # Tokens: vocabulary ids from 1, out-of-vocabulary 7, 0 pads; truncated to 4.
    words = block.x["words"]
    for row, event in zip(words, sample):
        expected = [WORDS.index(w) + 1 if WORDS.index(w) < 6 else 7 for w in event["words"][:4]]
        assert row.tolist() == expected + [0] * (4 - len(expected))
    # hyears is not standardised: it passes as sent.
    np.testing.assert_array_equal(block.x["numeric"][:, 4], [e["hyears"] for e in sample])


MALFORMED = [
    (b"", None, "empty value"),
    (b"\xff\xfe{", None, "bad bytes: not UTF-8"),
    (b'{"salary": 1', None, "bad JSON"),
    (b"[1, 2]", None, "expected an object"),
    ({"salary": None}, "salary", "field 'salary': missing"),
    ({"salary": "high"}, "salary", "field 'salary': expected a number, got str"),
    ({"salary": 1e300}, "salary", "field 'salary': non-finite"),
    ({"elevel": 1.5}, "elevel", "field 'elevel': expected a string, got float"),
    ({"elevel": None}, "elevel", "field 'elevel': missing"),
    ({"words": "cheap"}, "words", "field 'words': expected a list of strings, got str"),
    ({"words": ["cheap", {"a": 1}]}, "words", "field 'words': expected strings, got a dict"),
    ({"label": None}, "label", "field 'label': missing"),
    ({"label": "yes"}, "label", "field 'label': expected an integer class id"),
    ({"label": 7}, "label", "field 'label': label out of range: 7 not in [0, 2)"),
    ({"label": 2**70}, "label", "field 'label': expected an integer class id"),  # orjson: a float
    ({"concept": ["a"]}, "concept", "field 'concept': expected a string, got list"),
]


@pytest.mark.parametrize(("change", "field", "reason"), MALFORMED)
def test_every_malformed_record_is_dead_lettered_with_its_field_and_the_rest_decode(change, field, reason):
    sample = events(5)
    values = [orjson.dumps(e) for e in sample]
    values[2] = change if isinstance(change, bytes) else json.dumps({**sample[2], **change}).encode()
    block, letters = codec().decode(run_of(values))
    assert len(letters) == 1 and letters[0].record.position.offset == 2
    assert reason in letters[0].reason
    assert block.offsets.tolist() == [0, 1, 3, 4] and len(block) == 4
    assert all(len(array) == 4 for array in block.x.values())


def test_a_huge_label_value_is_quoted_by_its_start_in_the_reason_not_copied_whole():
    named = FieldsCodec(
        FieldSpec.from_dict({**SPEC_TABLE, "label_classes": ["no", "yes"]}), FeatureSpec((1,), "float32", 2)
    )
    regression = FieldsCodec(FieldSpec.from_dict(SPEC_TABLE), FeatureSpec((1,), "float32", None))
    for coder, fine, hostile, reason in [
        (codec(), 1, "x" * 10_000_000, "field 'label': expected an integer class id, got 'xxxx"),
        (codec(), 1, list(range(1_000_000)), "got [0, 1, 2,"),
        (named, "no", "y" * 10_000_000, "field 'label': unknown label 'yyyy"),
        (regression, 0.5, ["z"] * 1_000_000, "field 'label': expected a number, got ['z', "),
    ]:
        labels = [fine, hostile, fine]
        values = [orjson.dumps({**event, "label": label}) for event, label in zip(events(3), labels)]
        block, letters = coder.decode(run_of(values))
        assert block.offsets.tolist() == [0, 2] and len(letters) == 1
        assert reason in letters[0].reason and len(letters[0].reason) < 200, letters[0].reason[:300]


def test_missing_optional_fields_take_their_defaults():
    sample = events(3)
    del sample[0]["loan"], sample[1]["words"]
    block, letters = codec().decode(run_of([orjson.dumps(e) for e in sample]))
    assert not letters
    assert block.x["words"][1].tolist() == [0, 0, 0, 0]
    assert block.x["numeric"][0, 5] == 0.0  # loan's default (the partition's first row passes unchanged)


def test_label_strings_map_through_label_classes_and_unknown_ones_are_dead_lettered():
    spec = FieldSpec.from_dict({"label": "answer", "label_classes": ["no", "yes"], "x": {"kind": "numeric"}})
    coder = FieldsCodec(spec, FeatureSpec((1,), "float32", 2))
    values = [orjson.dumps({"x": 1, "answer": a}) for a in ("yes", "no", "maybe")]
    block, letters = coder.decode(run_of(values))
    assert block.y.tolist() == [1, 0]
    assert [letter.reason for letter in letters] == ["field 'answer': unknown label 'maybe' (not in label_classes)"]


# ---------------------------------------------------------------------------- statistics


def test_standardisation_does_not_depend_on_how_polls_cut_the_stream():
    values = [orjson.dumps(e) for e in events(100)]
    whole = encoded(values, [])
    assert_same(whole, encoded(values, [7, 8, 40, 41, 63]))
    assert_same(whole, encoded(values, list(range(1, 100))))
    # The first row passes unchanged; the rest of the first block (16) by the rows before each,
    # later ones by the merged blocks' statistics: salary (~1e5) becomes a few units at most.
    raw = np.asarray([e["salary"] for e in events(100)], np.float64)
    assert whole["numeric"][0, 0] == np.float32(raw[0])
    early = raw[:5]
    scale = max(early.std(), 0.1 * np.sqrt((early**2).mean()))
    np.testing.assert_allclose(whole["numeric"][5, 0], (raw[5] - early.mean()) / scale, rtol=1e-5)
    block = raw[:16]
    np.testing.assert_allclose(whole["numeric"][16, 0], (raw[16] - block.mean()) / block.std(), rtol=1e-5)
    assert np.abs(whole["numeric"][1:, 0]).max() < 15


def test_statistics_restored_from_a_checkpointed_state_encode_the_rest_as_the_uninterrupted_run():
    values = [orjson.dumps(e) for e in events(120)]
    whole = encoded(values, [])
    first = codec()
    encoded(values[:90], [33], first)  # decoded ahead of what was trained, as the ingest thread does
    state = json.loads(json.dumps(first.state(Positions({(TOPIC, 0): 50}))))  # through checkpoint metadata
    restarted = codec()
    restarted.restore(state)
    rest = encoded(values[50:], [11], restarted, start=50)
    assert_same({k: v[50:] for k, v in whole.items()}, rest)


def test_a_rewound_reader_decodes_again_with_the_statistics_at_its_offset():
    values = [orjson.dumps(e) for e in events(120)]
    whole = encoded(values, [])
    coder = codec()
    encoded(values[:70], [20], coder)
    coder.state(Positions({(TOPIC, 0): 30}))  # an accepted window ends at 30
    encoded(values[70:110], [], coder, start=70)
    again = encoded(values[30:], [5], coder, start=30)  # a retried window reads from 30 again
    assert_same({k: v[30:] for k, v in whole.items()}, again)


def test_partitions_keep_statistics_of_their_own():
    values = [orjson.dumps(e) for e in events(40)]
    coder = codec()
    a, _ = coder.decode(run_of(values, partition=0))
    b, _ = coder.decode(run_of(values[::-1], partition=1))
    alone, _ = codec().decode(run_of(values[::-1], partition=1))
    np.testing.assert_array_equal(b.x["numeric"], alone.x["numeric"])
    assert not np.array_equal(a.x["numeric"], b.x["numeric"][::-1])


# ---------------------------------------------------------------------------- inspect


def record(path, values: list[bytes]) -> None:
    writer = RecordingWriter(path)
    writer.write(run_of(values))
    writer.close()


def test_inspect_prints_a_config_that_loads_and_decodes_the_sampled_records(tmp_path, capsys):
    sample = events(300)
    for i, event in enumerate(sample):
        event["user"] = f"user-{i}"  # high cardinality: hashed
        event["device"] = ("ios", "android", "web")[i % 3]
        if i % 10 == 0:
            del event["device"]
    values = [orjson.dumps(e) for e in sample]
    recording = tmp_path / "events.parquet"
    record(recording, values)
    assert main(["inspect", "--file", str(recording), "--records", "200"]) == 0
    draft = capsys.readouterr().out
    assert 'codec = "fields"' in draft and "num_classes = 2" in draft
    assert 'segment = "concept"' in draft and "[stream.fields.words]" in draft and 'kind = "tokens"' in draft
    assert "buckets = " in draft.split("[stream.fields.user]")[1].split("[stream.fields.")[0]
    assert 'default = "' in draft.split("[stream.fields.device]")[1]
    path = tmp_path / "draft.toml"
    path.write_text(draft)
    config = load_config(path)
    from continuity.factory import feature_spec
    from continuity.stream import make_codec

    coder = make_codec("fields", feature_spec(config), fields=config.stream.field_spec())
    block, letters = coder.decode(run_of(values[:200]))
    assert not letters and len(block) == 200
    assert set(block.x) == set(config.stream.field_spec().inputs())


def test_inspect_drafts_from_what_the_codec_reads_and_its_draft_dead_letters_none_of_those_records(tmp_path, capsys):
    sample = events(60)
    for i, event in enumerate(sample):
        event["clicked_before"] = i % 3 == 0  # booleans: numbers to the codec, never a category
        event["é"] = float(i)  # a key TOML cannot take bare
        event["segment"] = {"id": i}  # not text: no segment (the codec would refuse every record)
        event["empty"] = []  # token lists, every one empty
        event["concept"] = "concept-1\n[evil]\nx = 1" if i == 7 else event["concept"]  # cannot end its comment
    values = [orjson.dumps(e) for e in sample]
    values[3] = values[3].replace(b'"salary":', b'"salary":NaN,"was":', 1)  # Python's json reads these two,
    values[5] = b"\xef\xbb\xbf" + values[5]  # the codec refuses them
    recording = tmp_path / "events.parquet"
    record(recording, values)
    assert main(["inspect", "--file", str(recording)]) == 0
    draft = capsys.readouterr().out
    assert "# 2 of the 60 records sampled are not a JSON object the fields codec reads" in draft
    path = tmp_path / "draft.toml"
    path.write_text(draft)
    config = load_config(path, environ={})
    from continuity.factory import feature_spec
    from continuity.stream import make_codec

    spec = config.stream.field_spec()
    assert spec.segment == "concept"
    assert [f.name for f in spec.numeric][-2:] == ["clicked_before", "é"]
    coder = make_codec("fields", feature_spec(config), fields=spec)
    block, letters = coder.decode(run_of([v for i, v in enumerate(values) if i not in (3, 5)]))
    assert not letters and len(block) == 58


def test_inspect_drafts_labels_the_codec_can_take():
    def draft(labels) -> str:
        return draft_config([{"amount": float(i), "label": y} for i, y in enumerate(labels)], source="test")

    huge = draft([0, 1, 10**12])  # not num_classes = 1000000000001
    assert 'task = "regression"' in huge and "num_classes =" not in huge
    assert "num_classes = 2" in draft([0, 1, -1]) and "1 labels below 0 would be dead-lettered" in draft([0, 1, -1])
    mixed = draft([0, 1, 1, "yes"])
    assert "num_classes = 2" in mixed and "1 of 4 labels are of another type" in mixed and "regression" not in mixed


def test_inspect_of_a_recording_without_records_says_so(tmp_path, capsys):
    recording = tmp_path / "empty.parquet"
    RecordingWriter(recording).close()
    assert main(["inspect", "--file", str(recording)]) == 2
    assert capsys.readouterr().err == f"continuity: error: recording {recording} holds no records to sample\n"


def test_inspect_without_a_topic_is_one_clear_line(capsys):
    assert main(["inspect", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "--bootstrap needs --topic" in capsys.readouterr().err


def test_a_poll_with_an_unparsable_record_decodes_the_others_exactly_as_a_clean_poll():
    values = [orjson.dumps(e) for e in events(12)]
    clean, _ = codec().decode(run_of(values))
    values[5] = b'{"salary": '
    block, letters = codec().decode(run_of(values))
    assert [letter.record.position.offset for letter in letters] == [5] and "bad JSON" in letters[0].reason
    for name in clean.x:
        if name != "numeric":  # standardised numbers depend on which examples came before
            np.testing.assert_array_equal(block.x[name], np.delete(clean.x[name], 5, axis=0), err_msg=name)
    np.testing.assert_array_equal(block.y, np.delete(clean.y, 5))


def test_hashed_ids_stay_the_blake2b_ids_when_their_cache_restarts(monkeypatch):
    monkeypatch.setattr(fields_module, "_HASH_CACHE", 4)  # restarts many times over this poll
    spec = FieldSpec.from_dict(
        {
            "label": "label",
            "user": {"kind": "categorical", "buckets": 1000},
            "tags": {"kind": "tokens", "length": 3, "buckets": 50},
        }
    )
    users = [f"u{i % 7}" for i in range(40)]
    tags = [[f"t{(i + k) % 11}" for k in range(i % 5)] for i in range(40)]
    values = [orjson.dumps({"user": u, "tags": t, "label": 0}) for u, t in zip(users, tags)]
    block, letters = FieldsCodec(spec, FeatureSpec((1,), "float32", 2)).decode(run_of(values))
    assert not letters
    assert block.x["user"].tolist() == [stable_hash(u) % 1000 for u in users]
    assert block.x["tags"].tolist() == [
        [1 + stable_hash(t) % 49 for t in row[:3]] + [0] * (3 - len(row[:3])) for row in tags
    ]


def test_tokens_past_the_length_are_cut_before_they_are_checked():
    sample = events(3)
    sample[1]["words"] = ["cheap", "fast", "loan", "house", {"not": "a token"}]
    block, letters = codec().decode(run_of([orjson.dumps(e) for e in sample]))
    assert not letters
    assert block.x["words"][1].tolist() == [1, 2, 3, 4]


def test_a_poll_parsed_in_chunks_decodes_as_one_parsed_whole(monkeypatch):
    sample = events(13)
    del sample[6]["loan"], sample[9]["words"]  # optional fields absent in later chunks
    values = [orjson.dumps(e) for e in sample]
    whole, letters = codec().decode(run_of(values))
    assert not letters
    monkeypatch.setattr(fields_module, "_PARSE_CHUNK", 4)
    chunked, letters = codec().decode(run_of(values))
    assert not letters
    assert_same(chunked.x, whole.x)
    np.testing.assert_array_equal(chunked.y, whole.y)
    assert chunked.segments == whole.segments
