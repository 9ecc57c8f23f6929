"""Named input fields and label vectors on the JSON wire, and the config keys that declare them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from continuity import factory
from continuity.config import ConfigError, load_config
from continuity.factory import feature_spec, learner_from_config, model_inputs
from continuity.stream import make_codec
from continuity.stream.codecs import CodecError, FeatureSpec, FieldSpec
from continuity.stream.records import PartitionRecords

NAMED = FeatureSpec(num_classes=5, inputs=(FieldSpec("tokens", (4,), "int32"), FieldSpec("numeric", (2,), "float32")))
MULTI = FeatureSpec((3,), "float32", num_classes=2, label_shape=(4,))


def records(values: list) -> PartitionRecords:
    offsets = np.arange(len(values), dtype=np.int64)
    return PartitionRecords(
        "t",
        0,
        [v if isinstance(v, bytes) else json.dumps(v).encode() for v in values],
        [None] * len(values),
        offsets,
        offsets,
    )


def good(tokens=(3, 17, 5, 2**31 - 1), numeric=(0.1, 2.0), y=3) -> dict:
    return {"x": {"tokens": list(tokens), "numeric": list(numeric)}, "y": y}


def test_named_fields_decode_to_a_dict_of_arrays_with_int32_token_ids_kept_exact():
    block, letters = make_codec("json", NAMED).decode(records([good(), good(tokens=(0, 1, 2, 3), y=0)]))
    assert letters == []
    assert set(block.x) == {"tokens", "numeric"}
    assert block.x["tokens"].dtype == np.int32 and block.x["numeric"].dtype == np.float32
    np.testing.assert_array_equal(block.x["tokens"], [[3, 17, 5, 2**31 - 1], [0, 1, 2, 3]])  # never via float
    np.testing.assert_allclose(block.x["numeric"], [[0.1, 2.0], [0.1, 2.0]])
    np.testing.assert_array_equal(block.y, [3, 0])


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"x": {"tokens": [1, 2, 3, 4]}, "y": 1}, "bad JSON: missing field(s) ['x.numeric']"),
        ({"x": {"tokens": [1, 2, 3, 4], "numeric": [1, 2], "extra": 1}, "y": 1}, "unknown field(s) ['x.extra']"),
        ({"x": [1, 2, 3, 4], "y": 1}, "bad JSON: x must be an object of fields ['numeric', 'tokens'], got list"),
        (good(tokens=(1, 2, 3)), "bad shape: x.tokens (3,) != configured (4,)"),
        (good(tokens=(1, 2, 3.5, 4)), "bad dtype: x.tokens must hold integers (int32)"),
        (good(tokens=(1, 2, 3.0, 4)), "bad dtype: x.tokens must hold integers (int32)"),
        (good(tokens=(1, 2, 2**31, 4)), "bad dtype: x.tokens holds 2147483648, beyond int32"),
        (good(tokens=(1, -(2**31) - 1, 3, 4)), "bad dtype: x.tokens holds -2147483649, beyond int32"),
        (good(tokens=(1, "2", 3, 4)), "bad shape: x.tokens is not a rectangular array of numbers"),
        (good(numeric=(1e300, 0)), "non-finite: x.numeric contains NaN or Inf, or a value beyond float32"),
        (good(y=5), "label out of range: 5 not in [0, 5)"),
    ],
)
def test_a_wrong_or_missing_field_is_a_dead_letter_naming_the_field(bad, reason):
    block, letters = make_codec("json", NAMED).decode(records([good(), bad, good(y=1)]))
    assert [letter.record.position.offset for letter in letters] == [1]
    assert reason in letters[0].reason
    np.testing.assert_array_equal(block.y, [3, 1])  # the good records around it are kept, in order
    assert block.offsets.tolist() == [0, 2]


def test_a_poll_of_mixed_records_keeps_every_good_one_and_orders_dead_letters():
    values = [good(y=i % 5) for i in range(50)]
    values[7] = good(tokens=(1, 2))
    values[8] = b"not json"
    values[30] = good(numeric=(float("nan"), 1.0)) | {"x": {"tokens": [1, 2, 3, 4], "numeric": [1e39, 1]}}
    block, letters = make_codec("json", NAMED).decode(records(values))
    assert [letter.record.position.offset for letter in letters] == [7, 8, 30]
    assert len(block) == 47 and block.x["tokens"].shape == (47, 4)


def test_one_array_without_named_inputs_decodes_as_before():
    spec = FeatureSpec((2, 2), "float32", 3)
    block, letters = make_codec("json", spec).decode(
        records([{"x": [[1, 2], [3, 4]], "y": 2}, {"x": [1, 2, 3, 4], "y": 0}])
    )
    assert letters == [] and block.x.dtype == np.float32 and block.x.shape == (2, 2, 2)
    _, letters = make_codec("json", spec).decode(records([{"x": [1, 2], "y": 0}]))
    assert letters[0].reason == "bad shape: (2,) != configured (2, 2)"


def test_multi_hot_labels_decode_as_int32_vectors_and_bad_ones_are_dead_letters():
    codec = make_codec("json", MULTI)
    values = [
        {"x": [1, 2, 3], "y": [0, 1, 0, 1]},
        {"x": [1, 2, 3], "y": [0, 1, 0]},
        {"x": [1, 2, 3], "y": [0, 2, 0, 1]},
        {"x": [1, 2, 3], "y": 1},
        json.loads(codec.encode(np.ones(3), np.array([1, 1, 0, 0]))),
    ]
    block, letters = codec.decode(records(values))
    np.testing.assert_array_equal(block.y, [[0, 1, 0, 1], [1, 1, 0, 0]])
    assert block.y.dtype == np.int32
    assert [letter.reason for letter in letters] == [
        "bad label: expected a list of 4 class ids, got a list of 3",
        "label out of range: 2 not in [0, 2)",
        "bad label: expected a list of 4 class ids, got int",
    ]


def test_the_binary_codec_refuses_named_inputs_and_label_vectors():
    for spec in (NAMED, MULTI):
        with pytest.raises(CodecError, match='need the "json" codec'):
            make_codec("binary", spec)


def test_encoding_named_fields_round_trips():
    codec = make_codec("json", NAMED)
    value = codec.encode({"tokens": np.array([1, 2, 3, 4], np.int32), "numeric": np.array([0.5, 1.5])}, np.int32(2))
    block, letters = codec.decode(records([value]))
    assert letters == [] and block.x["tokens"].tolist() == [[1, 2, 3, 4]] and block.y.tolist() == [2]


INPUTS = [
    "stream.codec=json",
    "stream.inputs.tokens.shape=[16]",
    'stream.inputs.tokens.dtype="int32"',
    "stream.inputs.numeric.shape=[2]",
]


def test_stream_inputs_make_the_codec_spec_and_the_learners_inputs(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[stream]\ncodec = "json"\n[stream.inputs.tokens]\nshape = [16]\ndtype = "int32"\n'
        '[stream.inputs.numeric]\nshape = [2]\n[model]\nfactory = "examples.tokens.model:build"\n'
        "[model.kwargs]\nvocab = 64\n"
    )
    config = load_config(path, environ={})
    spec = feature_spec(config)
    assert spec.inputs == (FieldSpec("tokens", (16,), "int32"), FieldSpec("numeric", (2,), "float32"))
    inputs = model_inputs(config)
    assert inputs["tokens"].dtype == np.int32 and inputs["numeric"].shape == (2,)
    assert config.learner.model.kwargs == {"vocab": 64}
    assert learner_from_config(config).inputs["tokens"].dtype == np.int32
    # The resolved config reads back as the same config, inputs and kwargs included.
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml())
    assert load_config(again, environ={}) == config
    assert config.digest() != load_config(again, ["stream.inputs.tokens.shape=[8]"], environ={}).digest()


def test_default_configs_show_no_inputs_and_named_inputs_need_the_json_codec():
    assert "inputs" not in load_config(None, environ={}).to_dict()["stream"]
    named = [
        "stream.inputs.tokens.shape=[16]",
        'stream.inputs.tokens.dtype="int32"',
        "model.factory=examples.tokens.model:build",
    ]
    with pytest.raises(ConfigError, match=r'\[stream\] codec: named inputs need codec = "json"'):
        load_config(None, named, environ={})


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["stream.codec=json", "stream.inputs.tokens.shape=[0]"],
            "[stream.inputs.tokens] shape (from --set): expected an array of positive integers",
        ),
        (
            ["stream.codec=json", "stream.inputs.tokens.shape=[4]", 'stream.inputs.tokens.dtype="int64"'],
            "[stream.inputs.tokens] dtype (from --set): must be one of 'float32', 'int32'",
        ),
        (
            ["stream.codec=json", "stream.inputs.tokens.shap=[4]"],
            "[stream.inputs.tokens] shap (from --set): unknown key",
        ),
        (["stream.codec=json", 'stream.inputs.tokens.dtype="int32"'], "[stream.inputs.tokens] shape: is required"),
        (["service.predict_max_rows=0"], "[service] predict_max_rows (from --set): must be >= 1"),
        (["model.factory=nope"], '[model] factory (from --set): expected "package.module:callable"'),
        (["model.factory=no_such_module_anywhere:build"], "[model] factory: cannot import 'no_such_module_anywhere'"),
        (["model.factory=json:no_such_callable"], "[model] factory: 'json' has no attribute 'no_such_callable'"),
        (["model.kwargs.outputs=3"], "[model] kwargs: keyword arguments are for a model factory"),
        (
            [*INPUTS, "model.factory=examples.tokens.model:build", "model.kwargs.outputs=3"],
            "multiple values for keyword argument 'outputs'",
        ),
        (
            [*INPUTS, "model.factory=examples.tokens.model:build", "model.kwargs.width=3"],
            "got an unexpected keyword argument 'width'",
        ),
        (["model.factory=examples.tokens.model:build"], "[model] factory: building examples.tokens.model:build failed"),
        ([*INPUTS, "model.factory=builtins:dict"], "must return an nnx.Module. Got dict"),
    ],
)
def test_bad_input_publish_and_model_keys_are_one_line_config_errors(overrides, words):
    # What `config check` (and every command that builds a learner) reports: the loader's checks,
    # then the factory's, which build the model once abstractly.
    with pytest.raises(ConfigError) as caught:
        factory.check(load_config(None, overrides, environ={}))
    message = str(caught.value)
    assert "\n" not in message and words in message, message
