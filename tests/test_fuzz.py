"""Property-based fuzzing: whatever the bytes, a codec (binary, json, fields) decodes or dead-letters
every record, and the config loader loads or raises ConfigError; nothing else ever escapes.

The suite runs a modest number of examples per property. `make fuzz` runs the same properties
with CONTINUITY_FUZZ_EXAMPLES examples each (several records per example) and prints how many
inputs ran and how many exceptions escaped.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from continuity.config import SECTIONS, Config, ConfigError, load_config
from continuity.stream import BinaryCodec, FeatureSpec, JsonCodec, PartitionRecords
from continuity.stream.codecs import MAGIC

pytestmark = pytest.mark.slow  # a property search: hundreds of generated inputs per test

FUZZ_EXAMPLES = int(os.environ.get("CONTINUITY_FUZZ_EXAMPLES", "0"))
RAN: Counter = Counter()  # inputs decoded or loaded, per target
ESCAPED: Counter = Counter()  # exceptions that got out, per target


def _settings(examples: int):
    return settings(
        max_examples=FUZZ_EXAMPLES or examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if FUZZ_EXAMPLES:
        inputs = ", ".join(f"{target} {RAN[target]:,}" for target in sorted(RAN))
        print(f"\nfuzz: inputs {inputs}; escaped exceptions {sum(ESCAPED.values())} {dict(ESCAPED)}")


SPECS = [
    FeatureSpec((2, 2), "float32", 3),
    FeatureSpec((3,), "float64", None),
    FeatureSpec((2, 1, 2), "float16", 5),
    FeatureSpec((4,), "uint8", 2),
]
KINDS = {
    "empty value",
    "bad bytes",
    "bad JSON",
    "bad header",
    "bad shape",
    "bad dtype",
    "bad label",
    "non-finite",
    "label out of range",
}


def _records(values: list) -> PartitionRecords:
    offsets = np.arange(len(values), dtype=np.int64)
    return PartitionRecords("t", 0, list(values), [None] * len(values), offsets, offsets)


def _decoded(target: str, codec, values: list, kinds: set[str]):
    """Decode `values`; check that each record is decoded or dead-lettered, once, with a reason of
    one line and a known kind; the block."""
    records = _records(values)
    RAN[target] += len(values)
    try:
        block, letters = codec.decode(records)
    except BaseException:
        ESCAPED[target] += 1
        raise
    lettered = [letter.record.position.offset for letter in letters]
    decoded = set(block.offsets.tolist())
    assert len(set(lettered)) == len(lettered) and decoded.isdisjoint(lettered)
    assert decoded | set(lettered) == set(range(len(values)))  # none lost
    for letter in letters:
        assert letter.kind in kinds and "\n" not in letter.reason, letter.reason
    return block


def _decode_all(target: str, codec, values: list) -> None:
    """Decode `values`; check that each record is decoded or dead-lettered, once, and the block is sound."""
    block = _decoded(target, codec, values, KINDS)
    spec = codec.spec
    assert block.x.dtype == np.float32 and block.x.shape == (len(block), *spec.shape)
    assert np.isfinite(block.x).all()
    assert block.y.dtype == spec.label_dtype
    if spec.num_classes is None:
        assert np.isfinite(block.y).all()
    else:
        assert ((block.y >= 0) & (block.y < spec.num_classes)).all()
    assert int(block.counts.sum()) == len(block) and len(block.segments) == len(block.offsets)
    for segment in block.segments:
        if segment is not None:
            segment.encode("utf-8")  # strict UTF-8: no lone surrogates
    for key in block.keys:
        assert key is None or isinstance(key, bytes)


# ---------------------------------------------------------------------------- JSON

surrogates = st.sampled_from(["\udfff", "\ud800", "a\udc00b", "\ud83d\ude00"])
texts = st.one_of(st.text(max_size=8), surrogates)
hostile_numbers = st.one_of(
    st.integers(),
    st.floats(),  # NaN and Inf too, which json writes as bare literals
    st.sampled_from([1e300, -1e300, 3.4e38, 3.5e38, -3.5e38, 1e39, 5e-324, -0.0, 2**64 - 1, 2**64, -(2**63) - 1]),
    st.integers(min_value=-(10**400), max_value=10**400),
)
json_values = st.recursive(
    st.none() | st.booleans() | hostile_numbers | texts,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)


def _dump(doc, ascii_only: bool) -> bytes:
    # Without ensure_ascii, a lone surrogate goes out as the three bytes UTF-8 forbids.
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def near_valid_documents(draw, spec: FeatureSpec) -> bytes:
    """A record shaped like the real thing, each field possibly hostile."""
    size = math.prod(spec.shape)
    numbers = draw(st.lists(st.one_of(st.floats(-10, 10), hostile_numbers), min_size=size, max_size=size))
    x = np.asarray(numbers, dtype=object).reshape(spec.shape).tolist() if draw(st.booleans()) else numbers
    x = draw(st.one_of(st.just(x), json_values))
    classes = spec.num_classes or 3
    fields = {"x": x, "y": draw(st.one_of(st.integers(-1, classes), st.floats(-5, 5), hostile_numbers, json_values))}
    for field in ("segment", "key"):
        if draw(st.booleans()):
            fields[field] = draw(st.one_of(texts, json_values))
    if draw(st.integers(0, 9)) == 0:
        fields[draw(texts)] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        del fields[draw(st.sampled_from(["x", "y"]))]
    ascii_only = draw(st.booleans())
    depth = draw(st.sampled_from([0, 0, 0, 1, 63, 64, 65, 1023, 1024, 1025, 5000]))  # x nested this much deeper
    parts = []
    for name, value in fields.items():
        text = _dump(value, ascii_only)
        if name == "x":
            text = b"[" * depth + text + b"]" * depth
        parts.append(_dump(name, ascii_only) + b": " + text)
    return b"{" + b", ".join(parts) + b"}"


@_settings(200)
@given(spec=st.sampled_from(SPECS), values=st.lists(st.binary(max_size=64), min_size=1, max_size=8))
def test_json_arbitrary_bytes_are_decoded_or_dead_lettered(spec, values):
    _decode_all("json", JsonCodec(spec), values)


@_settings(200)
@given(
    spec=st.sampled_from(SPECS),
    docs=st.lists(st.tuples(json_values, st.booleans()), min_size=1, max_size=8),
)
def test_json_arbitrary_documents_are_decoded_or_dead_lettered(spec, docs):
    _decode_all("json", JsonCodec(spec), [_dump(doc, ascii_only) for doc, ascii_only in docs])


@_settings(300)
@given(data=st.data(), spec=st.sampled_from(SPECS))
def test_json_near_valid_documents_with_hostile_values_are_decoded_or_dead_lettered(data, spec):
    values = data.draw(st.lists(near_valid_documents(spec), min_size=1, max_size=8))
    _decode_all("json", JsonCodec(spec), values)


# ---------------------------------------------------------------------------- binary

DTYPE_CODES = {"float32": 1, "float16": 2, "float64": 3, "uint8": 4}


@st.composite
def binary_records(draw, spec: FeatureSpec) -> bytes:
    """A record with a header like the spec's (or not), random payload bits, then mutations."""
    dtype = draw(st.sampled_from([spec.dtype] * 4 + list(DTYPE_CODES)))
    dtype_code = draw(st.sampled_from([DTYPE_CODES[dtype]] * 8 + [0, 5, 255]))
    regression = draw(st.sampled_from([spec.num_classes is None] * 4 + [True, False]))
    label_code = draw(st.sampled_from([2 if regression else 1] * 8 + [0, 3]))
    shape = draw(st.sampled_from([spec.shape] * 6 + [(), (1,), (2, 2, 2), (65536,), (1,) * 9]))
    count = draw(st.sampled_from([1, 1, 2, 3, 0, 2**32 - 1]))
    segment = draw(st.one_of(st.none(), st.binary(max_size=6), st.just("\udfff".encode("utf-8", "surrogatepass"))))
    key = draw(st.one_of(st.none(), st.binary(max_size=6)))
    flags = (segment is not None) | (key is not None) << 1
    flags = draw(st.sampled_from([flags] * 8 + [4, 0xFFFF]))
    reserved = draw(st.sampled_from([0] * 8 + [1]))
    size = min(count, 4) * math.prod(shape) * np.dtype(dtype).itemsize  # payload bits: NaN, Inf, huge, anything
    x = draw(st.binary(min_size=size, max_size=size)) if size <= 16384 else b""
    if regression:
        y = draw(st.binary(min_size=4 * min(count, 4), max_size=4 * min(count, 4)))  # any float32 bits
    else:
        labels = draw(st.lists(st.integers(-2, (spec.num_classes or 3) + 1), min_size=min(count, 4), max_size=4))
        y = struct.pack(f"<{len(labels)}i", *labels)
    header = struct.pack("<4sBBBBHHI", MAGIC, 1, dtype_code, label_code, min(len(shape), 255), flags, reserved, count)
    header += struct.pack(f"<{len(shape)}I", *shape)
    for extra in (segment, key):
        if extra is not None:
            header += struct.pack("<H", len(extra)) + extra
    value = bytearray(header + x + y)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 5]))):  # mutations
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "field"]))
        if kind == "flip" and value:
            value[draw(st.integers(0, len(value) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del value[draw(st.integers(0, len(value))) :]
        elif kind == "extend":
            value += draw(st.binary(min_size=1, max_size=8))
        elif kind == "field" and len(value) >= 16:
            offset = draw(st.integers(4, 15))
            value[offset : offset + 1] = draw(st.binary(min_size=1, max_size=1))
    return bytes(value)


@_settings(200)
@given(spec=st.sampled_from(SPECS), values=st.lists(st.binary(max_size=80), min_size=1, max_size=8))
def test_binary_arbitrary_bytes_are_decoded_or_dead_lettered(spec, values):
    _decode_all("binary", BinaryCodec(spec), values)


@_settings(300)
@given(data=st.data(), spec=st.sampled_from(SPECS))
def test_binary_valid_headers_with_mutated_fields_and_payloads_are_decoded_or_dead_lettered(data, spec):
    values = data.draw(st.lists(binary_records(spec), min_size=1, max_size=8))
    _decode_all("binary", BinaryCodec(spec), values)


# ---------------------------------------------------------------------------- config loader

_KEYS = {section: list(table) for section, table in Config().to_dict(redact=False).items()}
_SECRETS = ["sasl_plain_password", "ssl_password", "security_protocol", "ssl_check_hostname", "ssl_context"]
toml_literals = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(lambda f: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(f), repr(f))),
    st.booleans().map(lambda b: "true" if b else "false"),
    texts.map(lambda t: json.dumps(t)),  # a TOML basic string, or invalid TOML for a lone surrogate
    st.sampled_from(['""', "[]", "[1, 2]", '["a", 1]', "{}", "{ a = 1 }", "1979-05-27", "07:32:00", "[[1], [2]]"]),
    st.text(max_size=6),  # junk
)


@st.composite
def toml_documents(draw) -> str:
    lines = []
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "stream.security", "junk", "stream.x"]), max_size=4)):
        lines.append(f"[{section}]")
        known = _KEYS.get(section, []) + [key + "_env" for key in _KEYS.get(section, [])]
        if section == "stream.security":
            known = _SECRETS + [key + "_env" for key in _SECRETS]
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(known or ["k"]), st.from_regex(r"[A-Za-z_]{1,8}", fullmatch=True)))
            lines.append(f"{key} = {draw(toml_literals)}")
    return "\n".join(lines) + "\n"


set_strings = st.one_of(
    st.text(max_size=20),
    st.builds(
        lambda section, key, value: f"{section}.{key}={value}",
        st.sampled_from([*SECTIONS, "stream.security", "nope"]),
        st.sampled_from([key for keys in _KEYS.values() for key in keys] + _SECRETS + ["admin_token_env", "x"]),
        toml_literals,
    ),
)
environments = st.dictionaries(st.sampled_from(["T", "KAFKA_PW", "HOME"]), st.text(max_size=5), max_size=3)

_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="continuity-fuzz-"))


def _load(text: str | bytes, overrides: list, environ: dict) -> None:
    path = _CONFIG_DIR / "fuzz.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    RAN["config"] += 1
    try:
        load_config(path, overrides, environ=environ)
    except ConfigError as error:
        assert "\n" not in str(error)
    except BaseException:
        ESCAPED["config"] += 1
        raise


@_settings(100)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)), environ=environments)
def test_config_arbitrary_files_load_or_are_a_config_error(text, environ):
    _load(text, [], environ)


@_settings(300)
@given(text=toml_documents(), overrides=st.lists(set_strings, max_size=3), environ=environments)
def test_config_arbitrary_toml_and_set_strings_load_or_are_a_config_error(text, overrides, environ):
    _load(text, overrides, environ)


# ---------------------------------------------------------------------------- named-field events

FIELDS_SPEC = {
    "label": "label",
    "label_classes": ["no", "yes", "maybe"],
    "segment": "concept",
    "key": "user",
    "standardize_every": 4,
    "amount": {"kind": "numeric", "standardize": True},
    "age": {"kind": "numeric", "default": 30.0},
    "country": {"kind": "categorical", "vocabulary": ["DE", "FR", 3]},
    "device": {"kind": "categorical", "buckets": 8, "encoding": "one_hot"},
    "city": {"kind": "categorical", "buckets": 16, "default": "nowhere"},
    "words": {"kind": "tokens", "length": 3, "buckets": 32},
    "tags": {"kind": "tokens", "length": 2, "vocabulary": ["a", "b"], "optional": True},
}
# A record that parses is rejected naming its field: "field 'amount': missing".
EVENT_FIELDS = ("label", "concept", "user", "amount", "age", "country", "device", "city", "words", "tags")
FIELD_KINDS = {"empty value", "bad bytes", "bad JSON"} | {f"field {name!r}" for name in EVENT_FIELDS}


def _fields_codec():
    from continuity.stream.fields import FieldsCodec, FieldSpec

    return FieldsCodec(FieldSpec.from_dict(FIELDS_SPEC), FeatureSpec((1,), "float32", 3))


@st.composite
def near_valid_events(draw) -> bytes:
    """An event shaped like FIELDS_SPEC's, each field possibly hostile, absent or joined by others."""
    fine = {
        "label": st.sampled_from(["no", "yes", "maybe"]),
        "concept": texts,
        "user": texts,
        "amount": st.floats(-1e6, 1e6),
        "age": st.integers(0, 120),
        "country": st.sampled_from(["DE", "FR", 3]),
        "device": texts,
        "city": texts,
        "words": st.lists(texts, max_size=5),
        "tags": st.lists(st.sampled_from(["a", "b", "c"]), max_size=3),
    }
    event = {}
    for name, values in fine.items():
        choice = draw(st.integers(0, 9))
        if choice == 0:
            continue  # absent
        event[name] = draw(json_values if choice == 1 else (hostile_numbers if choice == 2 else values))
    if draw(st.integers(0, 4)) == 0:
        event[draw(texts)] = draw(json_values)
    return _dump(event, draw(st.booleans()))


def _decode_fields(values: list) -> None:
    codec = _fields_codec()
    block = _decoded("fields", codec, values, FIELD_KINDS)
    n = len(block)
    for name, (shape, dtype) in codec.fields.inputs().items():
        array = block.x[name]
        assert array.shape == (n, *shape) and array.dtype == np.dtype(dtype), name
        if array.dtype.kind == "f":
            assert np.isfinite(array).all(), name
    assert ((block.x["country"] >= 0) & (block.x["country"] < 4)).all()
    assert ((block.x["words"] >= 0) & (block.x["words"] < 33)).all()
    assert ((block.y >= 0) & (block.y < 3)).all()
    for text in (*block.segments, *(k.decode("utf-8") for k in block.keys if k is not None)):
        if text is not None:
            text.encode("utf-8")  # strict UTF-8: no lone surrogates


@_settings(200)
@given(values=st.lists(st.binary(max_size=64), min_size=1, max_size=8))
def test_fields_arbitrary_bytes_are_decoded_or_dead_lettered(values):
    _decode_fields(values)


@_settings(200)
@given(docs=st.lists(st.tuples(json_values, st.booleans()), min_size=1, max_size=8))
def test_fields_arbitrary_documents_are_decoded_or_dead_lettered(docs):
    _decode_fields([_dump(doc, ascii_only) for doc, ascii_only in docs])


@_settings(300)
@given(values=st.lists(near_valid_events(), min_size=1, max_size=8))
def test_fields_near_valid_events_with_hostile_values_are_decoded_or_dead_lettered(values):
    _decode_fields(values)
