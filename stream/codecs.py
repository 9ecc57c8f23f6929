"""Wire formats for examples (`json`, `binary`) and their validated, vectorised decoding.

`json`: one example per record, UTF-8 JSON object
    {"x": [...], "y": 3, "segment": "optional", "key": "optional"}
`x` is a nested list of the configured feature shape (or a flat list of its size); with
named inputs (`FeatureSpec.inputs`) it is an object with one such list per field,
    {"x": {"tokens": [3, 17, 5, ...], "numeric": [0.1, 2.0]}, "y": 3}
`y` an integer class in [0, num_classes) (or a finite number when the spec is
regression; or, with a `label_shape`, a list of that many class ids: a multi-hot vector
[0, 1, 0, 1] for a multi-label task). `segment` and `key` are optional strings; `key`
overrides the Kafka key. An int32 field holds JSON integers in int32's range (never a
number with a fraction or an exponent, never cast to float); a float32 field holds any
JSON numbers finite in float32. JSON decoding parses each record (orjson) and then
converts and checks each feature field for all of a poll's records at once, falling back
to one record at a time only to find which records are malformed.

`binary` (version 1): one example or a batch of examples per record, all little-endian:

    offset  size      field
    0       4         magic b"CTNY"
    4       1         version, uint8 = 1
    5       1         x dtype code, uint8: 1 float32, 2 float16, 3 float64, 4 uint8
    6       1         label code, uint8: 1 int32 class ids, 2 float32 regression targets
    7       1         ndim, uint8 (0..8): rank of ONE example's features
    8       2         flags, uint16: bit 0 segment present, bit 1 key present; others 0
    10      2         reserved, uint16 = 0
    12      4         count, uint32 >= 1: examples in this record
    16      4*ndim    shape, uint32 each (one example's feature shape)
    ...     2+S       if flags bit 0: segment length S (uint16) + S bytes UTF-8
    ...     2+K       if flags bit 1: key length K (uint16) + K bytes UTF-8 (overrides the Kafka key)
    ...     count*prod(shape)*itemsize   x, C order
    ...     count*4   y, int32 or float32 (one label per example)

The record's length must equal the header plus payload exactly. uint8 features are
converted to float32 as they are (no scaling). A batched record shares one segment and
key across its examples. The binary format carries one feature array and one label per
example: named inputs and label vectors are JSON only.

Decoding validates every record against the configured `FeatureSpec` (shape, wire dtype,
number of classes or regression) and rejects, as a `DeadLetter` with a one-line reason,
records that are empty, malformed, of another shape or dtype, non-finite, or whose label
is out of range. A batched record with one bad example is rejected whole. Binary decoding
groups records by header layout and decodes each group with `np.frombuffer`, so the
per-example work is NumPy only.

Decoding raises nothing, whatever the bytes: every failure is a dead-letter reason. So a
record is never trusted past what the checks prove: JSON is parsed by orjson, which
bounds nesting (1,024 levels), refuses numbers beyond a double and lone surrogates, and
needs no Python recursion; segments and keys must be strict UTF-8; and values are checked
for finiteness after the cast to float32, the dtype they are trained in (1e300 is a
finite double but inf in float32).
"""

from __future__ import annotations

import json
import math
import struct
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import orjson

from continuity.stream.deadletters import DeadLetter, shown
from continuity.stream.examples import ExampleBlock
from continuity.stream.records import PartitionRecords

MAGIC = b"CTNY"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBHHI")  # magic, version, dtype, label, ndim, flags, reserved, count
_FLAG_SEGMENT = 1
_FLAG_KEY = 2
_MAX_NDIM = 8

DTYPE_CODES = {1: "float32", 2: "float16", 3: "float64", 4: "uint8"}
_DTYPE_TO_CODE = {name: code for code, name in DTYPE_CODES.items()}
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in _DTYPE_TO_CODE}
LABEL_CLASS, LABEL_REGRESSION = 1, 2

CODECS = ("json", "binary", "fields")  # fields: named-field JSON events (stream/fields.py)


_NUMBER_BYTES = b"0123456789.eE+-"  # what a JSON number is written with
# A compact poll's structure as whitespace, records apart as numbers apart: its numbers stay,
# as one flat JSON list (a translation by table alone is twice as fast as one that deletes).
_COMPACT_TO_NUMBERS = bytes.maketrans(b'\n{}[]":xy', b",        ")
_NONFINITE_X = "non-finite: x contains NaN or Inf, or a value beyond float32"


INPUT_DTYPES = ("float32", "int32")  # what a named input field holds (FieldSpec.dtype)
_INT32 = np.iinfo(np.int32)


class CodecError(ValueError):
    """A codec was configured or asked to encode something invalid."""


@dataclass(frozen=True)
class FieldSpec:
    """One named input of an example: its shape and dtype ("float32" or "int32")."""

    name: str
    shape: tuple
    dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise CodecError(f"an input field needs a non-empty name. Got {self.name!r}")
        shape = tuple(int(d) for d in self.shape)
        # () is a scalar per example: what a categorical id of the `fields` codec is.
        if len(shape) > _MAX_NDIM or any(d <= 0 for d in shape):
            raise CodecError(
                f"input {self.name!r}: `shape` must have at most {_MAX_NDIM} positive dimensions. Got {self.shape!r}"
            )
        object.__setattr__(self, "shape", shape)
        if self.dtype not in INPUT_DTYPES:
            raise CodecError(f"input {self.name!r}: `dtype` must be one of {list(INPUT_DTYPES)}. Got {self.dtype!r}")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FeatureSpec:
    """What a valid example looks like: feature shape, wire dtype, and its label as the learner's
    task says (Task.label_classes): a class id in [0, num_classes), or, with None, a finite number.

    `inputs`: named input fields (JSON only); when given, an example's features are a dict
    of arrays, one per field, and `shape`/`dtype` are not used. `label_shape`: a label's
    own shape (a multi-label task's (num_labels,) multi-hot vector; JSON only).
    """

    shape: tuple = (8, 8, 1)
    dtype: str = "float32"
    num_classes: int | None = 10
    inputs: tuple[FieldSpec, ...] = ()
    label_shape: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "label_shape", tuple(int(d) for d in self.label_shape))
        names = [f.name for f in self.inputs]
        if not all(isinstance(f, FieldSpec) for f in self.inputs) or len(set(names)) != len(names):
            raise CodecError(f"`inputs` must be FieldSpecs with distinct names. Got {self.inputs!r}")
        if len(self.label_shape) > 1 or any(d <= 0 for d in self.label_shape):
            raise CodecError(f"`label_shape` must be () or (n,) with n > 0. Got {self.label_shape!r}")
        if self.label_shape and self.num_classes is None:
            raise CodecError("a label vector (`label_shape`) holds class ids: `num_classes` is required")
        shape = tuple(int(d) for d in self.shape)
        if len(shape) > _MAX_NDIM or any(d <= 0 for d in shape):
            raise CodecError(f"`shape` must have at most {_MAX_NDIM} positive dimensions. Got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if self.dtype not in _DTYPE_TO_CODE:
            raise CodecError(f"`dtype` must be one of {sorted(_DTYPE_TO_CODE)}. Got {self.dtype!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise CodecError(
                f"`num_classes` must be a positive integer or None (float labels). Got {self.num_classes!r}"
            )

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def label_dtype(self) -> np.dtype:
        """int32 class ids, or float32 numbers."""
        return np.dtype(np.int32) if self.num_classes is not None else np.dtype(np.float32)

    @property
    def named(self) -> bool:
        """Whether features are named fields (a dict of arrays) rather than one array."""
        return bool(self.inputs)

    def empty_features(self):
        """Features of no examples, shaped and typed as decoded ones."""
        if self.inputs:
            return {f.name: np.zeros((0, *f.shape), f.dtype) for f in self.inputs}
        return np.zeros((0, *self.shape), np.float32)


# ---------------------------------------------------------------------------- encoding


def encode_binary(
    x,
    y,
    *,
    dtype: str = "float32",
    segment: str | None = None,
    key: bytes | str | None = None,
) -> bytes:
    """One record in the binary format.

    A scalar `y` makes a single-example record (x has one example's shape); a 1-D `y` of
    length n makes a batched record (x has shape (n, *example_shape)). Integer labels are
    written as class ids, floating labels as regression targets.
    """
    if dtype not in _DTYPE_TO_CODE:
        raise CodecError(f"`dtype` must be one of {sorted(_DTYPE_TO_CODE)}. Got {dtype!r}")
    y = np.asarray(y)
    x = np.asarray(x)
    if y.ndim == 0:
        count, shape = 1, x.shape
    elif y.ndim == 1:
        count, shape = y.shape[0], x.shape[1:]
        if x.shape[0] != count:
            raise CodecError(f"x has {x.shape[0]} examples but y has {count}")
    else:
        raise CodecError(f"y must be a scalar or 1-D. Got shape {y.shape}")
    if count < 1:
        raise CodecError("a record must carry at least one example")
    if len(shape) > _MAX_NDIM:
        raise CodecError(f"features may have at most {_MAX_NDIM} dimensions. Got {len(shape)}")
    label_code = LABEL_CLASS if y.dtype.kind in "iub" else LABEL_REGRESSION
    flags = 0
    extra = b""
    if segment is not None:
        raw = segment.encode("utf-8")
        flags |= _FLAG_SEGMENT
        extra += struct.pack("<H", len(raw)) + raw
    if key is not None:
        raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        flags |= _FLAG_KEY
        extra += struct.pack("<H", len(raw)) + raw
    header = _HEADER.pack(MAGIC, VERSION, _DTYPE_TO_CODE[dtype], label_code, len(shape), flags, 0, count)
    header += struct.pack(f"<{len(shape)}I", *shape) + extra
    xs = np.ascontiguousarray(x, dtype=_WIRE_DTYPES[dtype]).tobytes()
    ys = np.ascontiguousarray(y, dtype="<i4" if label_code == LABEL_CLASS else "<f4").tobytes()
    return header + xs + ys


def encode_json(x, y, *, segment: str | None = None, key: str | None = None) -> bytes:
    """One record in the JSON format (x as a nested list of its shape, or a dict of them; y a
    number, or a list for a label vector).

    Numbers are written as orjson writes NumPy arrays: a float32 as the shortest text that
    reads back as the same float32 ("0.6369617", not its double's 17 digits), which halves a
    record and its parsing; decoding casts to float32, so the features are bit-identical.
    """
    features = {name: _json_array(v) for name, v in x.items()} if isinstance(x, dict) else _json_array(x)
    doc = {"x": features, "y": np.asarray(y).tolist()}
    if segment is not None:
        doc["segment"] = segment
    if key is not None:
        doc["key"] = key
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _json_array(values):
    """`values` as orjson writes it: a C-ordered array of a dtype it serialises, else nested lists."""
    array = np.asarray(values)
    if array.dtype in (np.float32, np.float64, np.int32, np.int64, np.uint8) and array.ndim:
        return np.ascontiguousarray(array)
    return array.tolist()


# ---------------------------------------------------------------------------- decoding


class _Reject(Exception):
    pass


def _empty_block(records: PartitionRecords, spec: FeatureSpec) -> ExampleBlock:
    return ExampleBlock(
        records.topic,
        records.partition,
        spec.empty_features(),
        np.zeros((0, *spec.label_shape), spec.label_dtype),
        np.zeros((0,), np.int32),
        np.zeros((0,), np.int32),
        np.zeros((0,), np.int64),
        np.zeros((0,), np.int32),
        [],
        [],
    )


def _apply_skip(block: ExampleBlock, records: PartitionRecords) -> ExampleBlock:
    """Drop the first `skip_first` examples of record 0 (already delivered before a restart)."""
    if not records.skip_first or len(block) == 0 or len(block.offsets) == 0:
        return block
    if block.offsets[0] != records.offsets[0]:
        return block
    first = block.record == 0
    drop = int(np.count_nonzero(first & (block.index < records.skip_first)))
    return block.slice(drop, len(block))


def _finite_float32(value: int | float) -> bool:
    """Whether a number stays finite once stored as float32 (1e300 is a finite double, inf in float32)."""
    try:
        return bool(np.isfinite(np.float32(value)))
    except OverflowError:  # an integer beyond any float
        return False


class Codec:
    """Decodes a partition's records into an ExampleBlock plus dead letters."""

    name = ""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def decode(self, records: PartitionRecords) -> tuple[ExampleBlock, list[DeadLetter]]:
        raise NotImplementedError

    def submit(self, records: PartitionRecords) -> Future:
        """`decode(records)` as a future: done already here; a codec decoding elsewhere returns at once
        (stream.decoder_process). The ingest thread submits and goes back to polling."""
        future: Future = Future()
        try:
            future.set_result(self.decode(records))
        except Exception as error:  # noqa: BLE001 - re-raised by the future's result(), in the caller
            future.set_exception(error)
        return future

    def start(self) -> None:
        """Readies decoding ahead of the first record (starts a decoder process); nothing here."""

    def close(self) -> None:
        """Releases what decoding holds (a decoder process); nothing here."""

    def encode(self, x, y, *, segment: str | None = None, key: str | None = None) -> bytes:
        raise NotImplementedError

    def state(self, positions) -> dict | None:
        """What a checkpoint at `positions` keeps so a restart decodes alike (JSON-ready); None: stateless."""
        return None

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint's `state` (what `state` returned when it was saved)."""


class _Field(NamedTuple):
    """A feature array to decode: its name in reasons ("x", or "x.tokens"), shape and dtype."""

    label: str
    shape: tuple
    dtype: str  # "float32" or "int32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class _Parsed(NamedTuple):
    """A poll's records as parsed, before their values are converted and checked."""

    rows: list  # the records parsed (indices into the poll), in order
    columns: list  # per feature field: its values, one per parsed record (a list, or an array of rows)
    labels: list  # the y of each parsed record, as JSON gave it
    segments: list  # str | None per parsed record
    keys: list  # bytes | None per parsed record: the record's own key, else the Kafka key
    letters: list[DeadLetter]  # records that did not parse, with their reasons


class JsonCodec(Codec):
    """The `json` codec: one example per record.

    One route for every poll: parse, then convert and check each field for all the
    poll's records at once (`_checked`), labels likewise (`_labels`), and assemble; a
    record whose value does not pass is dead-lettered with its reason, the rest decode.
    Parsing has a shortcut for what producers usually send, compact records of one array
    and a label written as `encode_json` writes them (`_parse_compact`: checked for that
    structure and parsed in one orjson call for the whole poll); any other poll is parsed
    record by record (`_parse_each`), which names the records that do not parse.
    """

    name = "json"
    _FIELDS = frozenset({"x", "y", "segment", "key"})

    def __init__(self, spec: FeatureSpec):
        super().__init__(spec)
        if spec.inputs:
            self._fields = [_Field(f"x.{f.name}", f.shape, f.dtype) for f in spec.inputs]
        else:
            self._fields = [_Field("x", spec.shape, "float32")]
        self._names = frozenset(f.name for f in spec.inputs)
        # What a compact record {"x":[...],"y":N} leaves once its numbers are taken out: its
        # skeleton, with x nested in the configured shape or flat (one skeleton when 1-D).
        self._skeletons: tuple[bytes, ...] = ()
        if not spec.inputs and spec.label_shape == ():
            nested, flat = (json.dumps(np.zeros(shape, np.int8).tolist()) for shape in (spec.shape, (spec.size,)))
            self._skeletons = tuple(
                dict.fromkeys(
                    b'{"x":%s,"y":}' % text.replace(" ", "").encode().translate(None, _NUMBER_BYTES)
                    for text in (nested, flat)
                )
            )
        # The brackets and commas of a compactly written nested x (b"" when x is flat anyway).
        self._nested = self._skeletons[0][5:-6] if len(self._skeletons) > 1 else b""

    def encode(self, x, y, *, segment=None, key=None) -> bytes:
        return encode_json(x, y, segment=segment, key=key)

    def features(self, instances: list):
        """Many examples' features as JSON-parsed values (a nested list each, or an object of
        fields): (the features, n rows each, bad rows zeroed; {row: reason} for the bad rows).
        What a prediction request's instances go through: the checks records go through."""
        columns: list[list] = [[] for _ in self._fields]
        reasons: dict[int, str] = {}
        for r, x in enumerate(instances):
            try:
                values = self._split(x)
                self._refuse_booleans(values)
            except _Reject as reject:
                reasons[r] = str(reject)
                values = [np.zeros(f.shape, f.dtype) for f in self._fields]
            for column, v in zip(columns, values):
                column.append(v)
        arrays = []
        with np.errstate(over="ignore", invalid="ignore"):
            for field, column in zip(self._fields, columns):
                array, bad = self._field(column, field)
                arrays.append(array)
                for r, reason in bad.items():
                    reasons.setdefault(r, reason)
        x = {f.name: array for f, array in zip(self.spec.inputs, arrays)} if self.spec.inputs else arrays[0]
        return x, dict(sorted(reasons.items()))

    def _split(self, x) -> list:
        """An example's `x` as one value per feature field, or _Reject naming what is missing or extra."""
        if not self.spec.inputs:
            return [x]
        if not isinstance(x, dict):
            raise _Reject(f"bad JSON: x must be an object of fields {sorted(self._names)}, got {type(x).__name__}")
        if x.keys() != self._names:
            lacking, extra = sorted(self._names - x.keys()), sorted(x.keys() - self._names)[:8]
            detail = "; ".join(
                part
                for part in (
                    f"missing field(s) {['x.' + n for n in lacking]}" if lacking else "",
                    f"unknown field(s) {['x.' + n for n in extra]}" if extra else "",
                )
                if part
            )
            raise _Reject(f"bad JSON: {detail}")
        return [x[f.name] for f in self.spec.inputs]

    def _envelope(self, value, kafka_key):
        """(the feature values, one per field, y, segment, key) of a record: its structure checked
        (the values are converted and checked with the poll's), or _Reject with the reason."""
        if not value:
            raise _Reject("empty value")
        try:
            doc = orjson.loads(self._flat(value) if self._nested else value)
        except orjson.JSONDecodeError:
            doc = self._parse_bad(value)
        if not isinstance(doc, dict):
            raise _Reject(f"bad JSON: expected an object, got {type(doc).__name__}")
        missing = {"x", "y"} - doc.keys()
        if missing:
            raise _Reject(f"bad JSON: missing field(s) {sorted(missing)}")
        unknown = doc.keys() - self._FIELDS
        if unknown:
            raise _Reject(f"bad JSON: unknown field(s) {sorted(unknown)[:8]}")
        features = self._split(doc["x"])
        if b"true" in value or b"false" in value:
            self._refuse_booleans(features)
        segment, key = doc.get("segment"), doc.get("key")
        if segment is not None and not isinstance(segment, str):
            raise _Reject(f"bad JSON: segment must be a string, got {type(segment).__name__}")
        if key is not None and not isinstance(key, str):
            raise _Reject(f"bad JSON: key must be a string, got {type(key).__name__}")
        try:  # orjson refuses lone surrogates already; this keeps it so whatever parses the text
            if segment is not None:
                segment.encode("utf-8")
            if key is not None:
                kafka_key = key.encode("utf-8")
        except UnicodeEncodeError:
            raise _Reject("bad JSON: key or segment is not valid Unicode (a lone surrogate)") from None
        return features, doc["y"], segment, kafka_key

    def _refuse_booleans(self, features: list) -> None:
        """_Reject a field holding true or false: numpy would read one among numbers as 1.0 or 0.0."""
        for field, value in zip(self._fields, features):
            stack = [value]
            while stack:  # not recursive: x may nest 1,024 deep
                item = stack.pop()
                if type(item) is bool:
                    raise _Reject(f"bad shape: {field.label} is not a rectangular array of numbers")
                if type(item) is list:
                    stack.extend(item)

    @staticmethod
    def _parse_bad(value):
        """A record that did not parse: _Reject with the reason, as the record itself has it."""
        try:
            return orjson.loads(value)  # never, unless flattening x (`_flat`) broke it: then as it is
        except orjson.JSONDecodeError as error:
            try:  # rare: only now tell bytes that are not UTF-8 from text that is not JSON
                bytes(value).decode("utf-8")
            except UnicodeDecodeError as not_utf8:
                raise _Reject(f"bad bytes: not UTF-8 ({not_utf8.reason})") from None
            raise _Reject(f"bad JSON: {error}") from None

    def _flat(self, value: bytes) -> bytes:
        """`value` with a compactly written nested x written flat, else as it is: parsing 73 nested
        lists per record, and keeping a poll's of them alive, costs several times one flat list
        (the garbage collector scans them again and again); x is reshaped when converted."""
        start, stop = value.find(b"["), value.rfind(b"]") + 1
        inner = value[start:stop]
        if start > 0 and inner.translate(None, _NUMBER_BYTES) == self._nested:
            return b"%s[%s]%s" % (value[:start], inner.translate(None, b"[]"), value[stop:])
        return value

    def _labels(self, labels: list) -> tuple[np.ndarray, dict[int, str]]:
        """The labels of a poll in the label dtype, (n, *label_shape) (bad rows zero), and each bad
        row's reason: checked as one array when they fit (the usual case), else one by one."""
        spec = self.spec
        n = len(labels)
        if not spec.label_shape:
            kinds = set(map(type, labels))
            try:
                if spec.num_classes is not None and kinds <= {int}:
                    ids = np.asarray(labels, np.int64).reshape(n)
                    if not ((ids < 0) | (ids >= spec.num_classes)).any():
                        return ids.astype(np.int32), {}
                elif spec.num_classes is None and kinds <= {int, float}:
                    with np.errstate(over="ignore", invalid="ignore"):
                        targets = np.asarray(labels, np.float64).reshape(n).astype(np.float32)
                    if np.isfinite(targets).all():
                        return targets, {}
            except OverflowError:  # an integer beyond int64: found below
                pass
        out = np.zeros((n, *spec.label_shape), spec.label_dtype)
        reasons: dict[int, str] = {}
        for r, y in enumerate(labels):
            try:
                out[r] = self._label(y)
            except _Reject as reject:
                reasons[r] = str(reject)
        return out, reasons

    def _label(self, y):
        spec = self.spec
        if spec.label_shape:  # a vector of class ids (a multi-hot vector: num_classes 2)
            (length,) = spec.label_shape
            if not isinstance(y, list) or len(y) != length:
                got = f"a list of {len(y)}" if isinstance(y, list) else type(y).__name__
                raise _Reject(f"bad label: expected a list of {length} class ids, got {got}")
            for v in y:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise _Reject(f"bad label: expected integer class ids, got {shown(v)}")
                if not 0 <= v < spec.num_classes:  # type: ignore[operator]  # label_shape requires num_classes
                    raise _Reject(f"label out of range: {v} not in [0, {spec.num_classes})")
            return y
        if isinstance(y, bool) or not isinstance(y, (int, float)):
            raise _Reject(f"bad label: expected a number, got {type(y).__name__}")
        if spec.num_classes is None:  # regression (spelled out so the else branch knows the class count)
            if not _finite_float32(y):
                raise _Reject("non-finite: regression target is NaN or Inf, or beyond float32")
        else:
            if not isinstance(y, int):
                raise _Reject(f"bad label: expected an integer class id, got {y!r}")
            if not 0 <= y < spec.num_classes:
                raise _Reject(f"label out of range: {y} not in [0, {spec.num_classes})")
        return y

    @staticmethod
    def _array(values, field: _Field) -> np.ndarray | None:
        """`values` (one example's field, or a list of them) as a numeric array, None when it is not one."""
        try:
            array = np.asarray(values)  # nesting deeper than numpy's 64 dimensions is a ValueError
        except (TypeError, ValueError, OverflowError):
            return None
        return array if array.dtype.kind in ("iu" if field.dtype == "int32" else "iuf") else None

    def _one(self, value, field: _Field) -> np.ndarray:
        """One example's field, converted and checked (the slow path that finds what is wrong)."""
        array = self._array(value, field)
        if array is None:
            if field.dtype == "int32" and self._array(value, _Field(field.label, field.shape, "float32")) is not None:
                raise _Reject(f"bad dtype: {field.label} must hold integers (int32), got numbers with a fraction")
            what = "x" if field.label == "x" else field.label
            raise _Reject(f"bad shape: {what} is not a rectangular array of numbers")
        if array.shape != field.shape:
            if array.ndim == 1 and array.size == field.size:
                array = array.reshape(field.shape)
            else:
                where = "" if field.label == "x" else f"{field.label} "
                raise _Reject(f"bad shape: {where}{array.shape} != configured {field.shape}")
        checked, reasons = self._checked(array[None], field)
        if reasons:
            raise _Reject(reasons[0])
        return checked[0]

    def _checked(self, array: np.ndarray, field: _Field) -> tuple[np.ndarray, dict[int, str]]:
        """Rows of `array` (examples on axis 0, each of the field's shape) in the field's dtype,
        and the reason each bad row is rejected."""
        reasons: dict[int, str] = {}
        rows = array.reshape(len(array), -1)
        if field.dtype == "int32":
            out_of_range = np.asarray(((rows < _INT32.min) | (rows > _INT32.max)).any(axis=1))
            for r in np.flatnonzero(out_of_range):
                wrong = rows[r][(rows[r] < _INT32.min) | (rows[r] > _INT32.max)][0]
                reasons[int(r)] = f"bad dtype: {field.label} holds {int(wrong)}, beyond int32"
            return np.where(out_of_range[:, None], 0, rows).astype(np.int32).reshape(array.shape), reasons
        # Via float64, as numbers always went: one rounding of integers beyond 2^24 as before.
        floats = array.astype(np.float64, copy=False).astype(np.float32)
        nonfinite = ~np.isfinite(floats.reshape(len(array), -1)).all(axis=1)  # after the cast: 1e300 is inf here
        for r in np.flatnonzero(nonfinite):
            reasons[int(r)] = _NONFINITE_X.replace("x", field.label, 1)
        return floats, reasons

    def _field(self, values: list, field: _Field) -> tuple[np.ndarray, dict[int, str]]:
        """One field of many examples: (n, *shape) in its dtype (bad rows zero), and each bad row's reason.

        One conversion for the whole list when every example has the configured shape (or
        its flat size); otherwise each example alone, which names the bad ones.
        """
        n = len(values)
        array = self._array(values, field)
        if array is not None and array.shape[:1] == (n,):
            if array.shape[1:] != field.shape and array.shape[1:] == (field.size,):
                array = array.reshape(n, *field.shape)
            if array.shape[1:] == field.shape:
                return self._checked(array, field)
        out = np.zeros((n, *field.shape), field.dtype)
        reasons: dict[int, str] = {}
        for r, value in enumerate(values):
            try:
                out[r] = self._one(value, field)
            except _Reject as reject:
                reasons[r] = str(reject)
        return out, reasons

    def _parse_compact(self, records: PartitionRecords) -> _Parsed | None:
        """The poll parsed at once when every record is compact, {"x":[...],"y":N} with nothing
        else (no space, no string, no literal); None when one is not.

        The structure is checked for the whole poll with one `translate`: without its number
        characters each record must be exactly the skeleton. Then the structure is blanked
        and every number of the poll is parsed by one orjson call, which checks each number's
        grammar: no Python object per record, and no nested list (building and freeing 73
        lists per record is most of what parsing a nested x costs).
        """
        values = records.values
        n = len(values)
        try:
            joined = b"\n".join(values)  # a newline is never in a compact record: records stay apart
        except TypeError:  # a tombstone (None): the per-record parse names it
            return None
        bare = joined.translate(None, _NUMBER_BYTES)
        if not any(bare == b"\n".join([skeleton] * n) for skeleton in self._skeletons):
            return None
        size = self.spec.size
        try:
            numbers = orjson.loads(b"[%s]" % joined.translate(_COMPACT_TO_NUMBERS))
            if len(numbers) != n * (size + 1):
                return None
            x = np.fromiter(numbers, np.float64, len(numbers)).reshape(n, size + 1)[:, :size]
        except (orjson.JSONDecodeError, TypeError, ValueError, OverflowError):
            return None  # a number that is not JSON, or beyond a double: the per-record parse names it
        rows = list(range(n))
        return _Parsed(rows, [x], numbers[size :: size + 1], [None] * n, list(records.keys), [])

    def _parse_each(self, records: PartitionRecords) -> _Parsed:
        """The poll parsed record by record; the records that do not parse as dead letters."""
        parsed = _Parsed([], [[] for _ in self._fields], [], [], [], [])
        for i, value in enumerate(records.values):
            try:
                values, y, segment, key = self._envelope(value, records.keys[i])
            except _Reject as reject:
                parsed.letters.append(DeadLetter(records.record(i), str(reject)))
                continue
            for column, v in zip(parsed.columns, values):
                column.append(v)
            parsed.rows.append(i)
            parsed.labels.append(y)
            parsed.segments.append(segment)
            parsed.keys.append(key)
        return parsed

    def decode(self, records: PartitionRecords) -> tuple[ExampleBlock, list[DeadLetter]]:
        spec = self.spec
        with np.errstate(over="ignore", invalid="ignore"):  # values that overflow float32 are rejected, not warned
            parsed = (self._parse_compact(records) if self._skeletons and len(records) else None) or self._parse_each(
                records
            )
            y, reasons = self._labels(parsed.labels)  # a bad label is the reason, before the features'
            arrays: list[np.ndarray] = []
            for field, column in zip(self._fields, parsed.columns):
                array, bad = self._field(column, field)
                arrays.append(array)
                for r, reason in bad.items():
                    reasons.setdefault(r, reason)  # the first field's reason
        rows, segments, keys, letters = parsed.rows, parsed.segments, parsed.keys, parsed.letters
        if reasons:
            for r, reason in reasons.items():
                letters.append(DeadLetter(records.record(rows[r]), reason))
            letters.sort(key=lambda letter: letter.record.position.offset)
            keep = np.ones(len(rows), bool)
            keep[list(reasons)] = False
            arrays = [array[keep] for array in arrays]
            y = y[keep]
            kept = np.flatnonzero(keep).tolist()
            rows = [rows[r] for r in kept]
            segments, keys = [segments[r] for r in kept], [keys[r] for r in kept]
        if not rows:
            return _empty_block(records, spec), letters
        n = len(rows)
        x = {f.name: array for f, array in zip(spec.inputs, arrays)} if spec.inputs else arrays[0]
        block = ExampleBlock(
            records.topic,
            records.partition,
            x,
            y,
            np.arange(n, dtype=np.int32),
            np.zeros(n, np.int32),
            records.offsets if n == len(records) else records.offsets[np.asarray(rows)],
            np.ones(n, np.int32),
            segments,
            keys,
        )
        return _apply_skip(block, records), letters


class BinaryCodec(Codec):
    """The `binary` codec: header-described little-endian arrays, decoded with np.frombuffer."""

    name = "binary"

    def __init__(self, spec: FeatureSpec):
        if spec.inputs or spec.label_shape:
            raise CodecError(
                "the binary wire format carries one feature array and one label per example: "
                'named inputs or label vectors need the "json" codec'
            )
        super().__init__(spec)
        self._dtype_code = _DTYPE_TO_CODE[spec.dtype]
        self._wire = _WIRE_DTYPES[spec.dtype]
        self._label_code = LABEL_CLASS if spec.label_dtype.kind == "i" else LABEL_REGRESSION
        self._label_wire = spec.label_dtype.newbyteorder("<")
        self._example_bytes = spec.size * self._wire.itemsize

    def encode(self, x, y, *, segment=None, key=None) -> bytes:
        y = np.asarray(y, dtype=self.spec.label_dtype)
        return encode_binary(x, y, dtype=self.spec.dtype, segment=segment, key=key)

    def _parse_header(self, value: bytes):
        """(header length, count, segment, key) of a record, or _Reject with the reason."""
        spec = self.spec
        if not value:
            raise _Reject("empty value")
        if len(value) < _HEADER.size:
            raise _Reject(f"bad bytes: {len(value)} bytes is shorter than the {_HEADER.size}-byte header")
        magic, version, dtype_code, label_code, ndim, flags, reserved, count = _HEADER.unpack_from(value)
        if magic != MAGIC:
            raise _Reject(f"bad bytes: magic {magic!r} is not {MAGIC!r}")
        if version != VERSION:
            raise _Reject(f"bad header: unsupported version {version} (this reader knows {VERSION})")
        if flags & ~(_FLAG_SEGMENT | _FLAG_KEY) or reserved:
            raise _Reject(f"bad header: unknown flags {flags:#x} or reserved {reserved:#x}")
        if dtype_code != self._dtype_code:
            raise _Reject(f"bad dtype: {DTYPE_CODES.get(dtype_code, f'code {dtype_code}')} != configured {spec.dtype}")
        if label_code != self._label_code:
            want = "class ids" if self._label_code == LABEL_CLASS else "regression targets"
            raise _Reject(f"bad label: label code {label_code}, configured {want}")
        if count < 1:
            raise _Reject("bad header: count is 0")
        end = _HEADER.size + 4 * ndim
        if len(value) < end:
            raise _Reject("bad bytes: truncated shape")
        shape = struct.unpack_from(f"<{ndim}I", value, _HEADER.size)
        if shape != spec.shape:
            raise _Reject(f"bad shape: {shape} != configured {spec.shape}")
        segment = key = None
        try:
            if flags & _FLAG_SEGMENT:
                (length,) = struct.unpack_from("<H", value, end)
                segment = value[end + 2 : end + 2 + length].decode("utf-8")
                end += 2 + length
            if flags & _FLAG_KEY:
                (length,) = struct.unpack_from("<H", value, end)
                key = value[end + 2 : end + 2 + length]
                key.decode("utf-8")  # strict, as the segment: no invalid bytes, no encoded surrogates
                end += 2 + length
        except struct.error:
            raise _Reject("bad bytes: truncated segment or key") from None
        except UnicodeDecodeError:
            raise _Reject("bad bytes: segment or key is not UTF-8") from None
        expected = end + count * (self._example_bytes + 4)
        if len(value) != expected:
            raise _Reject(f"bad bytes: length {len(value)} != {expected} expected from the header")
        return end, count, segment, key

    def decode(self, records: PartitionRecords) -> tuple[ExampleBlock, list[DeadLetter]]:
        spec = self.spec
        values = records.values
        n = len(values)
        letters: list[DeadLetter] = []
        # Pass 1 (per record, cheap): parse headers; group records that share a layout.
        groups: dict[tuple, list[int]] = {}
        counts = np.zeros(n, np.int32)
        segments: list = [None] * n
        keys: list = list(records.keys)
        ok = np.zeros(n, bool)
        # The previous parsed header; the others are read only while last_prefix is set.
        last_prefix: bytes | None = None
        last_len = -1
        last_group: list[int] = []
        last_meta: tuple[int, str | None, bytes | None] = (0, None, None)
        for i, value in enumerate(values):
            # Runs of records with an identical header (the usual case) skip the parse.
            if (
                last_prefix is not None
                and value is not None
                and len(value) == last_len
                and value.startswith(last_prefix)
            ):
                last_group.append(i)
                counts[i] = last_meta[0]
                segments[i] = last_meta[1]
                if last_meta[2] is not None:
                    keys[i] = last_meta[2]
                ok[i] = True
                continue
            try:
                header_len, count, segment, key = self._parse_header(value)
            except _Reject as reject:
                letters.append(DeadLetter(records.record(i), str(reject)))
                continue
            group = groups.setdefault((header_len, count), [])
            group.append(i)
            counts[i] = count
            segments[i] = segment
            if key is not None:
                keys[i] = key
            ok[i] = True
            last_prefix, last_len, last_group, last_meta = value[:header_len], len(value), group, (count, segment, key)
        # Pass 2 (vectorised per group): payload bytes -> arrays, then value checks.
        decoded = []
        for (header_len, count), rows in groups.items():
            m = len(rows)
            if m == 1:
                buf = values[rows[0]]
            else:
                buf = b"".join([values[i] for i in rows])
            raw = np.frombuffer(buf, np.uint8).reshape(m, -1)
            xbytes = count * self._example_bytes
            x = np.ascontiguousarray(raw[:, header_len : header_len + xbytes]).view(self._wire)
            with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf: rejected below
                x = x.reshape(m, count * spec.size).astype(np.float32, copy=False)
            y = np.ascontiguousarray(raw[:, header_len + xbytes :]).view(self._label_wire).reshape(m, count)
            bad = np.zeros(m, bool)
            reasons = {}
            if self._wire.kind == "f":  # checked after the cast to float32, the dtype it is trained in
                nonfinite = ~np.isfinite(x).all(axis=1)
                for r in np.flatnonzero(nonfinite):
                    reasons[r] = _NONFINITE_X
                bad |= nonfinite
            if spec.num_classes is None:  # regression (spelled out so the else branch knows the class count)
                nonfinite_y = ~np.isfinite(y).all(axis=1) & ~bad
                for r in np.flatnonzero(nonfinite_y):
                    reasons[r] = "non-finite: regression target is NaN or Inf"
                bad |= nonfinite_y
            else:
                out_of_range = ((y < 0) | (y >= spec.num_classes)).any(axis=1) & ~bad
                for r in np.flatnonzero(out_of_range):
                    wrong = y[r][(y[r] < 0) | (y[r] >= spec.num_classes)][0]
                    reasons[r] = f"label out of range: {int(wrong)} not in [0, {spec.num_classes})"
                bad |= out_of_range
            rows_arr = np.asarray(rows)
            for r, reason in reasons.items():
                i = int(rows_arr[r])
                ok[i] = False
                letters.append(DeadLetter(records.record(i), reason))
            keep = ~bad
            decoded.append((rows_arr[keep], count, x[keep], y[keep]))
        if letters:
            letters.sort(key=lambda letter: letter.record.position.offset)
        good = np.flatnonzero(ok)
        if len(good) == 0:
            return _empty_block(records, spec), letters
        # Assemble in stream order. Row r of the block's per-record columns is good[r].
        record_counts = counts[good]
        total = int(record_counts.sum())
        if len(decoded) == 1 and len(decoded[0][0]) == len(good):
            _, count, x, y = decoded[0]
            x_out = x.reshape(total, *spec.shape)
            y_out = y.reshape(total).astype(spec.label_dtype, copy=False)
        else:
            starts = np.zeros(n, np.int64)
            starts[good] = np.cumsum(record_counts) - record_counts
            x_out = np.empty((total, *spec.shape), np.float32)
            y_out = np.empty((total,), spec.label_dtype)
            for rows_kept, count, x, y in decoded:
                dest = (starts[rows_kept][:, None] + np.arange(count)).reshape(-1)
                x_out[dest] = x.reshape(-1, *spec.shape)
                y_out[dest] = y.reshape(-1)
        record_of = np.repeat(np.arange(len(good), dtype=np.int32), record_counts)
        if total == len(good):
            index = np.zeros(total, np.int32)
        else:
            index = (np.arange(total) - np.repeat(np.cumsum(record_counts) - record_counts, record_counts)).astype(
                np.int32
            )
        good_list = good.tolist()
        block = ExampleBlock(
            records.topic,
            records.partition,
            x_out,
            y_out,
            record_of,
            index,
            records.offsets[good],
            record_counts,
            [segments[i] for i in good_list],
            [keys[i] for i in good_list],
        )
        return _apply_skip(block, records), letters


def make_codec(name: str, spec: FeatureSpec, *, fields=None) -> Codec:
    """The codec called `name` ('json', 'binary', or 'fields' with a `fields` FieldSpec) for examples like `spec`."""
    if name == "fields":
        from continuity.stream.fields import FieldsCodec  # it builds on this module

        if fields is None:
            raise CodecError("the 'fields' codec needs a feature spec ([stream.fields])")
        return FieldsCodec(fields, spec)
    if name == "json":
        return JsonCodec(spec)
    if name == "binary":
        return BinaryCodec(spec)
    raise CodecError(f"`codec` must be one of {list(CODECS)}. Got {name!r}")
