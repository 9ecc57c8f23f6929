"""Named-field JSON events as model inputs: the feature spec (`[stream.fields]`) and the `fields` codec.

Real topics carry events with named fields, `{"amount": 12.5, "country": "DE", "tags":
["a", "b"], "clicked": 1}`; the spec says which fields the model sees and how each
becomes an array, so a producer needs no rewriting:

- numeric: a number (booleans as 0 and 1), optionally standardised; all numeric fields form one block
  `"numeric": float32[F]`, in the spec's order;
- categorical: a string (or integer) as an id from a fixed vocabulary (with one
  out-of-vocabulary id after it) or hashed into `buckets`; `int32[]` for an embedding,
  or `float32[N]` one-hot;
- tokens: a list of strings (or integers) as ids, truncated or padded to `length` with
  id 0 (padding; real tokens get ids >= 1): `int32[length]`;
- the label: a class id, a string mapped through `label_classes`, or (no classes) a
  number; optional `key` and `segment` fields; `default`s for missing optional fields.

`FieldSpec.inputs()` describes the arrays without JAX (name -> (shape, dtype)), so the
application builds the learner's inputs from it. A record that does not fit (bad JSON,
not UTF-8, a missing required field, a wrong type, a non-finite number, an unknown label)
is a `DeadLetter` whose reason names the field. Fields the spec does not name are
ignored (events carry more than a model uses).

Hashing is stable across processes (BLAKE2b of the UTF-8 text, never Python's salted
`hash()`), so a restart or another host gives the same ids.

Standardisation, and why it replays bit-identically: statistics are kept per partition
(the unit Kafka orders), over valid examples only. Each partition's examples are taken
in blocks of `standardize_every`; an example is standardised with the statistics of all
*complete* blocks before it, and a block joins the statistics when its last example is
decoded, merged with Chan et al.'s parallel update (Chan, Golub & LeVeque 1979) from its
own mean and sum of squares. So the encoding depends on the partition's order only, not
on how polls happened to cut it, and a restart from any position encodes exactly as the
uninterrupted run did. Until the first block completes, each value is standardised by
the mean and standard deviation of the partition's values before it (prefix sums over
the open block's rows; the scale at least a tenth of their RMS), so no raw 1e5-scale
salary reaches a fresh model. The
codec's state (merged statistics plus the rows of the open block) is what a checkpoint
keeps (`FieldsCodec.state(positions)`, `FieldsCodec.restore(state)`); the codec also
keeps the rows it decoded since the last checkpointed state, so a reader that rewinds
(a retried window) finds the statistics as they were at the offset it rewinds to.
Vocabularies are fixed by the spec (part of the config digest), so they need no state.

Decoding is vectorised per poll: records are parsed with orjson, each field becomes a
column list, the column's types are checked in one pass, and one `np.asarray` makes its
array. Only a column that fails the check is walked record by record, to name the
reason; tokens are mapped per token (a dict lookup, or a cached hash).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from continuity.stream.codecs import Codec, FeatureSpec, _apply_skip
from continuity.stream.deadletters import DeadLetter, shown
from continuity.stream.examples import ExampleBlock
from continuity.stream.records import PartitionRecords, Positions

KINDS = ("numeric", "categorical", "tokens")
ENCODINGS = ("embedding", "one_hot")
NUMERIC_INPUT = "numeric"  # the name of the block of numeric fields among the model's inputs
SETTINGS = ("label", "label_classes", "key", "segment", "standardize_every")
DEFAULT_STANDARDIZE_EVERY = 512
_MAX_RUNS = 4096  # decoded runs kept per partition between checkpointed states (for rewinds)
_PARSE_CHUNK = 256  # records parsed at a time (FieldsCodec._parse_poll)
_HASH_CACHE = 1 << 16  # distinct values whose hash a field remembers (the cache restarts beyond)
MAX_BUCKETS = 2**31 - 1  # ids are int32: hashed ids lie below `buckets`


class FieldSpecError(ValueError):
    """A `[stream.fields]` table is invalid; the message names the field and what is wrong."""


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text`'s UTF-8 bytes, the same in every process (BLAKE2b, unsalted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class _Ids(dict):
    """Text -> id for one field: its vocabulary's ids, and hashed ids remembered as they are met.

    `__missing__` works out what the dict does not hold (the out-of-vocabulary id, or a
    hash it then remembers), so a whole column maps through `map(ids.__getitem__, column)`
    without a Python call per known value.
    """

    def __init__(self, vocabulary: tuple[str, ...] | None, first: int, hashed):
        super().__init__({word: first + i for i, word in enumerate(vocabulary or ())})
        self.unknown = None if vocabulary is None else first + len(vocabulary)  # out-of-vocabulary id
        self.hashed = hashed  # text -> id, for a field without a vocabulary

    def __missing__(self, text: str) -> int:
        if self.unknown is not None:
            return self.unknown
        if len(self) >= _HASH_CACHE:
            self.clear()
        found = self[text] = self.hashed(text)
        return found


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise FieldSpecError(f"{where}: {message}")


def _positive_int(value, where: str, key: str, minimum: int = 1) -> int:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        where,
        f"`{key}` must be an integer >= {minimum}. Got {value!r}.",
    )
    return value


def _vocabulary(value, where: str) -> tuple[str, ...]:
    _check(
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value),
        where,
        f"`vocabulary` must be a non-empty list of strings (or integers). Got {value!r}.",
    )
    words = tuple(str(v) for v in value)
    _check(len(set(words)) == len(words), where, "`vocabulary` lists a value twice.")
    return words


@dataclass(frozen=True)
class NumericField:
    """A number; `standardize` scales it by the running statistics (module docstring)."""

    name: str
    standardize: bool = False
    default: float | None = None  # None: required

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": "numeric", "standardize": self.standardize}
        if self.default is not None:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class CategoricalField:
    """A string (or integer) as an id: from `vocabulary` (out-of-vocabulary = its length) or hashed."""

    name: str
    vocabulary: tuple[str, ...] | None = None
    buckets: int | None = None
    encoding: str = "embedding"  # "embedding": int32 id; "one_hot": float32[size]
    default: str | None = None  # None: required
    lookup: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # _Ids

    def __post_init__(self):
        object.__setattr__(self, "lookup", _Ids(self.vocabulary, 0, self._hashed))

    @property
    def size(self) -> int:
        """How many ids there are (what an embedding table or a one-hot vector needs)."""
        return len(self.vocabulary) + 1 if self.vocabulary is not None else int(self.buckets or 0)

    def id_of(self, text: str) -> int:
        return self.lookup[text]

    def _hashed(self, text: str) -> int:
        return stable_hash(text) % self.size

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": "categorical", "encoding": self.encoding}
        if self.vocabulary is not None:
            out["vocabulary"] = list(self.vocabulary)
        else:
            out["buckets"] = self.buckets
        if self.default is not None:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class TokensField:
    """A list of strings (or integers) as `length` ids; 0 pads, vocabulary ids start at 1
    (out-of-vocabulary: its length + 1), hashed ids lie in [1, buckets)."""

    name: str
    length: int
    vocabulary: tuple[str, ...] | None = None
    buckets: int | None = None
    optional: bool = False  # True: a missing field is an empty list
    lookup: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # _Ids

    def __post_init__(self):
        object.__setattr__(self, "lookup", _Ids(self.vocabulary, 1, self._hashed))

    @property
    def size(self) -> int:
        return len(self.vocabulary) + 2 if self.vocabulary is not None else int(self.buckets or 0)

    def id_of(self, text: str) -> int:
        return self.lookup[text]

    def _hashed(self, text: str) -> int:
        return 1 + stable_hash(text) % (self.size - 1)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": "tokens", "length": self.length}
        if self.vocabulary is not None:
            out["vocabulary"] = list(self.vocabulary)
        else:
            out["buckets"] = self.buckets
        if self.optional:
            out["optional"] = True
        return out


Field = NumericField | CategoricalField | TokensField


def _parse_field(name: str, table) -> Field:
    where = f"field {name!r}"
    _check(isinstance(table, Mapping), where, f"expected a table [stream.fields.{name}]. Got {table!r}.")
    kind = table.get("kind")
    _check(kind in KINDS, where, f"`kind` must be one of {', '.join(map(repr, KINDS))}. Got {kind!r}.")
    allowed = {
        "numeric": {"kind", "standardize", "default"},
        "categorical": {"kind", "vocabulary", "buckets", "encoding", "default"},
        "tokens": {"kind", "length", "vocabulary", "buckets", "optional"},
    }[kind]
    unknown = sorted(set(table) - allowed)
    _check(not unknown, where, f"unknown key(s) {unknown} for a {kind} field; expected some of {sorted(allowed)}.")
    if kind == "numeric":
        standardize = table.get("standardize", False)
        _check(isinstance(standardize, bool), where, f"`standardize` must be true or false. Got {standardize!r}.")
        default = table.get("default")
        if default is not None:
            _check(
                isinstance(default, (int, float)) and not isinstance(default, bool) and math.isfinite(default),
                where,
                f"`default` must be a finite number. Got {default!r}.",
            )
            default = float(default)
        return NumericField(name, standardize, default)
    vocabulary = _vocabulary(table["vocabulary"], where) if "vocabulary" in table else None
    buckets = table.get("buckets")
    _check(
        (vocabulary is None) != (buckets is None),
        where,
        "give either `vocabulary` (a list of values) or `buckets` (hashed ids), one of them.",
    )
    if buckets is not None:
        _positive_int(buckets, where, "buckets", 2)
        _check(
            buckets <= MAX_BUCKETS, where, f"`buckets` must be at most {MAX_BUCKETS} (ids are int32). Got {buckets}."
        )
    if kind == "categorical":
        encoding = table.get("encoding", "embedding")
        _check(
            encoding in ENCODINGS,
            where,
            f"`encoding` must be one of {', '.join(map(repr, ENCODINGS))}. Got {encoding!r}.",
        )
        default = table.get("default")
        if default is not None:
            _check(
                isinstance(default, str) or (isinstance(default, int) and not isinstance(default, bool)),
                where,
                f"`default` must be a string (or an integer). Got {default!r}.",
            )
            default = str(default)
        return CategoricalField(name, vocabulary, buckets, encoding, default)
    length = _positive_int(table.get("length"), where, "length")
    optional = table.get("optional", False)
    _check(isinstance(optional, bool), where, f"`optional` must be true or false. Got {optional!r}.")
    return TokensField(name, length, vocabulary, buckets, optional)


@dataclass(frozen=True)
class FieldSpec:
    """Which fields of a JSON event become which model inputs (see the module docstring)."""

    fields: tuple[Field, ...]
    label: str
    label_classes: tuple[str, ...] | None = None  # label strings -> ids 0..n-1; None: ids or numbers as sent
    key: str | None = None
    segment: str | None = None
    standardize_every: int = DEFAULT_STANDARDIZE_EVERY

    @classmethod
    def from_dict(cls, table: Mapping) -> FieldSpec:
        """The spec a `[stream.fields]` table describes; FieldSpecError names the field and the fault."""
        if not isinstance(table, Mapping):
            raise FieldSpecError(f"expected a [stream.fields] table. Got {table!r}.")
        settings = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        unknown = sorted(set(settings) - set(SETTINGS))
        _check(
            not unknown,
            "[stream.fields]",
            f"unknown setting(s) {unknown}; expected some of {list(SETTINGS)}, and a table per field "
            "([stream.fields.NAME] with a `kind`).",
        )
        label = settings.get("label")
        _check(
            isinstance(label, str) and bool(label),
            "[stream.fields]",
            f"`label` must name the label field. Got {label!r}.",
        )
        for name in ("key", "segment"):
            value = settings.get(name)
            _check(
                value is None or (isinstance(value, str) and bool(value)),
                "[stream.fields]",
                f"`{name}` must name a field. Got {value!r}.",
            )
        classes = settings.get("label_classes")
        if classes is not None:
            classes = _vocabulary(classes, "label_classes")
        every = _positive_int(
            settings.get("standardize_every", DEFAULT_STANDARDIZE_EVERY), "[stream.fields]", "standardize_every"
        )
        fields = tuple(_parse_field(name, value) for name, value in table.items() if isinstance(value, Mapping))
        _check(bool(fields), "[stream.fields]", "no field is described: add a table [stream.fields.NAME] per input.")
        taken = {label, settings.get("key"), settings.get("segment")}
        for spec_field in fields:
            _check(
                spec_field.name not in taken,
                f"field {spec_field.name!r}",
                "is the label, key or segment field; it cannot also be an input.",
            )
            _check(
                spec_field.name != NUMERIC_INPUT or isinstance(spec_field, NumericField),
                f"field {spec_field.name!r}",
                f"the input {NUMERIC_INPUT!r} is the block of numeric fields: rename this field's input.",
            )
        return cls(fields, str(label), classes, settings.get("key"), settings.get("segment"), every)

    def to_dict(self) -> dict:
        """The plain table `from_dict` reads back (the config keeps and digests this)."""
        out: dict[str, Any] = {"label": self.label}
        if self.label_classes is not None:
            out["label_classes"] = list(self.label_classes)
        if self.key is not None:
            out["key"] = self.key
        if self.segment is not None:
            out["segment"] = self.segment
        out["standardize_every"] = self.standardize_every
        for spec_field in self.fields:
            out[spec_field.name] = spec_field.to_dict()
        return out

    @property
    def numeric(self) -> tuple[NumericField, ...]:
        return tuple(f for f in self.fields if isinstance(f, NumericField))

    def inputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The model inputs this spec produces, name -> (one example's shape, dtype), without JAX."""
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        if self.numeric:
            out[NUMERIC_INPUT] = ((len(self.numeric),), "float32")
        for spec_field in self.fields:
            if isinstance(spec_field, CategoricalField):
                one_hot = spec_field.encoding == "one_hot"
                out[spec_field.name] = ((spec_field.size,), "float32") if one_hot else ((), "int32")
            elif isinstance(spec_field, TokensField):
                out[spec_field.name] = ((spec_field.length,), "int32")
        return out

    def vocabulary_sizes(self) -> dict[str, int]:
        """Ids per integer input (embedding table sizes): categorical embeddings and token lists."""
        return {
            f.name: f.size
            for f in self.fields
            if isinstance(f, TokensField) or (isinstance(f, CategoricalField) and f.encoding == "embedding")
        }


# ---------------------------------------------------------------------------- running statistics


@dataclass
class _Stats:
    """One partition's standardisation state: merged blocks' statistics and the open block's rows."""

    count: int  # examples merged (a multiple of standardize_every)
    mean: np.ndarray  # shape=(F,), dtype=float64
    m2: np.ndarray  # shape=(F,), dtype=float64: sum of squared deviations (Chan et al. 1979)
    pending: np.ndarray  # shape=(p < standardize_every, F), dtype=float64: the open block's raw rows

    @classmethod
    def empty(cls, width: int) -> _Stats:
        return cls(0, np.zeros(width), np.zeros(width), np.zeros((0, width)))

    def copy(self) -> _Stats:
        return _Stats(self.count, self.mean.copy(), self.m2.copy(), self.pending.copy())

    def scale(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) to standardise with: identity until a block is merged; std 1 for a constant."""
        if self.count == 0:
            return np.zeros_like(self.mean), np.ones_like(self.mean)
        std = np.sqrt(self.m2 / self.count)
        return self.mean, np.where(std > 1e-12, std, 1.0)

    def merge(self, block: np.ndarray) -> None:
        """Chan et al.'s parallel update with one complete block of rows."""
        n_b = len(block)
        mean_b = block.mean(axis=0)
        m2_b = ((block - mean_b) ** 2).sum(axis=0)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / total)
        self.count = total

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "pending": self.pending.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict, width: int) -> _Stats:
        pending = np.asarray(data["pending"], np.float64).reshape(-1, width)
        return cls(
            int(data["count"]), np.asarray(data["mean"], np.float64), np.asarray(data["m2"], np.float64), pending
        )


def _first_block(before: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """`chunk` standardised row by row by the mean and std of the partition's rows before each (the
    first block: nothing is merged yet); the partition's first row passes unchanged."""
    rows = np.concatenate([before, chunk]) if len(before) else chunk
    seen = np.arange(len(before), len(rows), dtype=np.float64)[:, None]  # rows before each of chunk's
    sums = np.concatenate([np.zeros((1, rows.shape[1])), np.cumsum(rows, axis=0)])[len(before) : len(rows)]
    squares = np.concatenate([np.zeros((1, rows.shape[1])), np.cumsum(rows**2, axis=0)])[len(before) : len(rows)]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(seen > 0, sums / seen, 0.0)
        mean_square = np.where(seen > 0, squares / seen, 0.0)
    std = np.sqrt(np.maximum(mean_square - mean**2, 0.0))
    # A handful of rows can agree closely: the scale is at least a tenth of their RMS, so an early
    # value is never blown up by a spread that is not known yet.
    scale = np.maximum(std, 0.1 * np.sqrt(mean_square))
    return (chunk - mean) / np.where(scale > 0, scale, 1.0)


def _standardize(stats: _Stats, rows: np.ndarray, every: int, out: np.ndarray | None) -> None:
    """Advance `stats` over `rows` (raw, float64) block by block; with `out`, write each row standardised
    by the statistics of the blocks completed before it."""
    start = 0
    while start < len(rows):
        take = min(every - len(stats.pending), len(rows) - start)
        chunk = rows[start : start + take]
        if out is not None and stats.count == 0:
            out[start : start + take] = _first_block(stats.pending, chunk)
        elif out is not None:
            mean, std = stats.scale()
            out[start : start + take] = (chunk - mean) / std
        stats.pending = np.concatenate([stats.pending, chunk]) if len(stats.pending) else chunk.copy()
        if len(stats.pending) == every:
            stats.merge(stats.pending)
            stats.pending = stats.pending[:0]
        start += take


@dataclass
class _Decoded:
    """A run of one partition as decoded: the state before it, and its valid rows' offsets and raw numbers."""

    start: int  # first offset of the run
    before: _Stats
    offsets: np.ndarray  # shape=(m,), dtype=int64
    rows: np.ndarray  # shape=(m, F), dtype=float64
    after: _Stats  # the state after the run


# ---------------------------------------------------------------------------- the codec


class _Column:
    """One field's values across a poll's records, and the reasons of the rows that do not fit."""

    def __init__(self, n: int):
        self.bad: dict[int, str] = {}
        self.n = n

    def reject(self, row: int, reason: str) -> None:
        self.bad.setdefault(row, reason)


_NUMBER_TYPES = {int, float, bool}  # booleans count as 0 and 1
_TEXT_TYPES = {str, int}


def _as_text(value) -> str | None:
    """A categorical value as text: strings as they are, integers in decimal; None for any other type."""
    kind = type(value)
    if kind is str:
        return value
    if kind is int:
        return str(value)
    return None


class FieldsCodec(Codec):
    """The `fields` codec: named-field JSON events decoded by a `FieldSpec` (see the module docstring).

    Threading: `decode` runs on the ingest thread; `state` and `restore` may be called from
    the loop's thread (a lock orders them).
    """

    name = "fields"

    def __init__(self, fields: FieldSpec, spec: FeatureSpec):
        super().__init__(spec)  # the label part (classes or numbers) as the task has them
        self.fields = fields
        if fields.label_classes is not None and spec.num_classes != len(fields.label_classes):
            raise FieldSpecError(
                f"label_classes lists {len(fields.label_classes)} labels but the task counts "
                f"{spec.num_classes} classes (stream.num_classes)."
            )
        self._label_ids = (
            {word: i for i, word in enumerate(fields.label_classes)} if fields.label_classes is not None else None
        )
        self._numeric = fields.numeric
        settings = (fields.label, fields.key, fields.segment)
        self._names = tuple(f.name for f in fields.fields) + tuple(name for name in settings if name is not None)
        self._standardized = np.array([f.standardize for f in self._numeric], bool)
        self._width = int(self._standardized.sum())
        self._lock = threading.Lock()
        self._history: dict[tuple[str, int], list[_Decoded]] = {}  # per partition, runs in offset order
        self._base: dict[tuple[str, int], tuple[int, _Stats]] = {}  # restored: (offset, state at it)

    def encode(self, x, y, *, segment=None, key=None) -> bytes:
        """One event from a dict of raw field values (`x`) and a label (tests and tools)."""
        event = dict(x)
        event[self.fields.label] = y.item() if isinstance(y, np.generic) else y
        if self.fields.key is not None and key is not None:
            event[self.fields.key] = key
        if self.fields.segment is not None and segment is not None:
            event[self.fields.segment] = segment
        return orjson.dumps(event)

    # -- state: what a checkpoint keeps
    def state(self, positions: Positions) -> dict | None:
        """The standardisation state at `positions` (as if decoding had stopped there), JSON-ready;
        None when no field is standardised. Forgets what it decoded before those positions."""
        if not self._width:
            return None
        partitions = []
        with self._lock:
            for topic, partition in positions:
                offset = positions[(topic, partition)].offset
                stats = self._stats_at((topic, partition), offset, prune=True)
                partitions.append({"topic": topic, "partition": partition, "offset": offset, **stats.to_json()})
        return {"standardize_every": self.fields.standardize_every, "partitions": partitions}

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint's `state` (None: from nothing); what was decoded since is forgotten."""
        with self._lock:
            self._history.clear()
            self._base.clear()
            if not state or not self._width:
                return
            for entry in state["partitions"]:
                stats = _Stats.from_json(entry, self._width)
                self._base[(entry["topic"], int(entry["partition"]))] = (int(entry["offset"]), stats)

    def _stats_at(self, partition: tuple[str, int], offset: int, *, prune: bool = False) -> _Stats:
        """The state of `partition` before its record at `offset`.

        Decoding (prune False) forgets the runs at or after `offset` (a rewind reads them
        again); a checkpoint (prune True) forgets what lies before it instead.
        """
        runs = self._history.setdefault(partition, [])
        i = len(runs)
        while i > 0 and runs[i - 1].start >= offset:
            i -= 1
        if i == 0:
            # Before every run remembered: the state restored, checkpointed or trimmed to last, else none.
            base = self._base.get(partition)
            stats = base[1].copy() if base is not None else _Stats.empty(self._width)
        else:
            run = runs[i - 1]
            kept = int(np.searchsorted(run.offsets, offset))
            if kept == len(run.offsets):
                stats = run.after.copy()
            else:
                stats = run.before.copy()
                _standardize(stats, run.rows[:kept], self.fields.standardize_every, None)
            if prune:  # the run that holds `offset` now starts there; nothing before it is needed again
                runs[:i] = [_Decoded(offset, stats.copy(), run.offsets[kept:], run.rows[kept:], run.after)]
                self._base[partition] = (offset, stats.copy())
                return stats
        if not prune:
            del runs[i:]
        return stats

    # -- decoding
    def decode(self, records: PartitionRecords) -> tuple[ExampleBlock, list[DeadLetter]]:
        letters: list[DeadLetter] = []
        rows: list[int] = []
        columns = self._parse_poll(records.values)
        if columns is not None:
            rows = list(range(len(records)))
        else:  # a record that is not an object holding every field: parsed one by one, bad ones named
            columns = self._columns(self._parse_each(records, letters, rows))
        return self._decode_columns(records, columns, rows, letters)

    def _parse_poll(self, values: list) -> dict[str, Sequence] | None:
        """Every named field's values (None where absent) when every record parses as an object
        (the usual case), with no Python work per record when it holds every field; else None.

        Parsed a chunk at a time, each chunk's documents freed before the next is parsed: a
        poll's thousands of dicts kept alive at once make the garbage collector scan them
        again and again, which costs about a tenth of decoding.
        """
        names = self._names
        getter, loads = itemgetter(*names), orjson.loads
        rows_of_values: list[tuple] = []
        try:
            for start in range(0, len(values), _PARSE_CHUNK):
                docs = list(map(loads, values[start : start + _PARSE_CHUNK]))
                if not set(map(type, docs)) <= {dict}:
                    return None
                try:
                    rows_of_values.extend(list(map(getter, docs)))
                except KeyError:  # a field absent (one with a default, or missing): looked up one by one
                    rows_of_values.extend([tuple(map(doc.get, names)) for doc in docs])
        except (orjson.JSONDecodeError, TypeError):  # an empty or unparsable record
            return None
        if not rows_of_values:
            return {name: () for name in names}
        return dict(zip(names, zip(*rows_of_values)))

    def _parse_each(self, records: PartitionRecords, letters: list[DeadLetter], rows: list[int]) -> list[dict]:
        """The records that parse as objects (their indices appended to `rows`); the others as dead letters."""
        docs = []
        loads = orjson.loads
        for i, value in enumerate(records.values):
            if not value:
                letters.append(DeadLetter(records.record(i), "empty value"))
                continue
            try:
                doc = loads(value)
            except orjson.JSONDecodeError as error:
                try:
                    bytes(value).decode("utf-8")
                    reason = f"bad JSON: {error}"
                except UnicodeDecodeError as not_utf8:
                    reason = f"bad bytes: not UTF-8 ({not_utf8.reason})"
                letters.append(DeadLetter(records.record(i), reason))
                continue
            if type(doc) is not dict:
                letters.append(DeadLetter(records.record(i), f"bad JSON: expected an object, got {type(doc).__name__}"))
                continue
            docs.append(doc)
            rows.append(i)
        return docs

    def _decode_columns(
        self, records: PartitionRecords, columns: dict[str, Sequence], rows: list[int], letters: list[DeadLetter]
    ) -> tuple[ExampleBlock, list[DeadLetter]]:
        n = len(rows)
        bad: dict[int, str] = {}
        x: dict[str, np.ndarray] = {}
        raw_numeric = self._numbers(columns, n, bad) if self._numeric else None
        for spec_field in self.fields.fields:
            if isinstance(spec_field, CategoricalField):
                ids = self._categorical(spec_field, columns[spec_field.name], bad)
                if spec_field.encoding == "one_hot":
                    one_hot = np.zeros((n, spec_field.size), np.float32)
                    one_hot[np.arange(n), ids] = 1.0
                    x[spec_field.name] = one_hot
                else:
                    x[spec_field.name] = ids
            elif isinstance(spec_field, TokensField):
                x[spec_field.name] = self._tokens(spec_field, columns[spec_field.name], bad)
        y = self._labels(columns[self.fields.label], bad)
        segments = self._texts(self.fields.segment, columns, n, bad)
        keys = self._texts(self.fields.key, columns, n, bad)
        if bad:
            for j in sorted(bad):
                letters.append(DeadLetter(records.record(rows[j]), bad[j]))
            letters.sort(key=lambda letter: letter.record.position.offset)
            keep = np.ones(n, bool)
            keep[list(bad)] = False
            x = {name: array[keep] for name, array in x.items()}
            y = y[keep]
            if raw_numeric is not None:
                raw_numeric = raw_numeric[keep]
            kept_list = np.flatnonzero(keep).tolist()
            segments = [segments[j] for j in kept_list]
            keys = [keys[j] for j in kept_list]
            rows = [rows[j] for j in kept_list]
        offsets = records.offsets[np.asarray(rows, np.int64)] if rows else np.zeros(0, np.int64)
        if raw_numeric is not None:
            x = {NUMERIC_INPUT: self._standardize(records, offsets, raw_numeric), **x}
        m = len(rows)
        kafka_keys = records.keys
        block = ExampleBlock(
            records.topic,
            records.partition,
            x,
            y,
            np.arange(m, dtype=np.int32),
            np.zeros(m, np.int32),
            offsets,
            np.ones(m, np.int32),
            segments,
            [kafka_keys[i] if k is None else k for i, k in zip(rows, keys)],
        )
        return _apply_skip(block, records), letters

    def _standardize(self, records: PartitionRecords, offsets: np.ndarray, raw: np.ndarray) -> np.ndarray:
        out = raw.astype(np.float32)
        if not self._width or not len(records):
            return out
        chosen = raw[:, self._standardized]
        scaled = np.empty_like(chosen)
        partition = (records.topic, records.partition)
        with self._lock:
            first = int(records.offsets[0])
            stats = self._stats_at(partition, first)  # a rewind finds the state at its offset
            before = stats.copy()
            _standardize(stats, chosen, self.fields.standardize_every, scaled)
            runs = self._history.setdefault(partition, [])
            runs.append(_Decoded(first, before, offsets.copy(), chosen, stats.copy()))
            if len(runs) > _MAX_RUNS:  # nobody asked for a state for long: keep memory bounded
                self._base[partition] = (runs[1].start, runs[1].before)
                del runs[0]
        with np.errstate(over="ignore", invalid="ignore"):
            out[:, self._standardized] = scaled.astype(np.float32)
        return out

    def _columns(self, docs: list[dict]) -> dict[str, Sequence]:
        """Every named field's values across `docs` (None where absent), a sequence per field.

        When every document has every field (the usual case), one C-level getter per
        document and a transposition build them; else a lookup per field and document.
        """
        names = self._names
        if not docs:
            return {name: () for name in names}
        try:
            return dict(zip(names, zip(*map(itemgetter(*names), docs))))
        except KeyError:
            return {name: [doc.get(name) for doc in docs] for name in names}

    def _numbers(self, columns: dict, n: int, bad: dict[int, str]) -> np.ndarray:
        """(n, F) float64 raw numbers; rows that do not fit get reasons in `bad`."""
        arrays = []
        for spec_field in self._numeric:
            column = columns[spec_field.name]
            if not set(map(type, column)) <= _NUMBER_TYPES:
                column = self._fix_numbers(spec_field, column, bad)
            try:
                values = np.asarray(column, np.float64)
            except OverflowError:  # an integer beyond any double
                values = np.asarray([self._float_or_nan(v) for v in column], np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                finite = np.isfinite(values.astype(np.float32))
            for j in np.flatnonzero(~finite):
                bad.setdefault(
                    int(j), f"field {spec_field.name!r}: non-finite: {shown(column[j])} is not a float32 number"
                )
            arrays.append(values)
        return np.stack(arrays, axis=1) if arrays else np.zeros((n, 0))

    @staticmethod
    def _float_or_nan(value) -> float:
        try:
            return float(value)
        except OverflowError:
            return math.nan

    @staticmethod
    def _fix_numbers(spec_field: NumericField, column: Sequence, bad: dict[int, str]) -> list:
        fixed = []
        for j, value in enumerate(column):
            if type(value) in _NUMBER_TYPES:
                fixed.append(value)
                continue
            if value is None and spec_field.default is not None:
                fixed.append(spec_field.default)
                continue
            reason = "missing" if value is None else f"expected a number, got {type(value).__name__}"
            bad.setdefault(j, f"field {spec_field.name!r}: {reason}")
            fixed.append(0.0)
        return fixed

    def _categorical(self, spec_field: CategoricalField, column: Sequence, bad: dict[int, str]) -> np.ndarray:
        if set(map(type, column)) == {str}:  # the usual case: one dict lookup (or cached hash) each
            return np.fromiter(map(spec_field.lookup.__getitem__, column), np.int32, len(column))
        ids = []
        for j, value in enumerate(column):
            if value is None and spec_field.default is not None:
                value = spec_field.default
            text = _as_text(value)
            if text is None:
                reason = "missing" if value is None else f"expected a string, got {type(value).__name__}"
                bad.setdefault(j, f"field {spec_field.name!r}: {reason}")
                ids.append(0)
            else:
                ids.append(spec_field.id_of(text))
        return np.asarray(ids, np.int32).reshape(len(column))

    def _tokens(self, spec_field: TokensField, column: Sequence, bad: dict[int, str]) -> np.ndarray:
        length = spec_field.length
        n = len(column)
        out = np.zeros((n, length), np.int32)
        if set(map(type, column)) == {list}:
            tokens = list(chain.from_iterable(column))
            if set(map(type, tokens)) <= {str}:  # the usual case, vectorised: tokens past `length` are cut
                found = np.fromiter(map(spec_field.lookup.__getitem__, tokens), np.int32, len(tokens))
                counts = np.fromiter(map(len, column), np.int64, n)
                rows = np.repeat(np.arange(n), counts)
                places = np.arange(len(found)) - np.repeat(np.cumsum(counts) - counts, counts)
                kept = places < length
                out[rows[kept], places[kept]] = found[kept]
                return out
        lists = [value[:length] if type(value) is list else value for value in column]
        for j, value in enumerate(lists):
            if value is None:
                if not spec_field.optional:
                    bad.setdefault(j, f"field {spec_field.name!r}: missing")
                continue
            if type(value) is not list:
                bad.setdefault(j, f"field {spec_field.name!r}: expected a list of strings, got {type(value).__name__}")
                continue
            ids = []
            for token in value:
                text = _as_text(token)
                if text is None:
                    bad.setdefault(j, f"field {spec_field.name!r}: expected strings, got a {type(token).__name__}")
                    break
                ids.append(spec_field.id_of(text))
            out[j, : len(ids)] = ids
        return out

    def _labels(self, column: Sequence, bad: dict[int, str]) -> np.ndarray:
        name = self.fields.label
        n = len(column)
        dtype = self.spec.label_dtype
        classes = self.spec.num_classes
        if self._label_ids is not None:
            ids = self._label_ids
            named: list[int] = []
            for j, value in enumerate(column):
                found = ids.get(value) if type(value) is str else None
                if found is None:
                    reason = "missing" if value is None else f"unknown label {shown(value)} (not in label_classes)"
                    bad.setdefault(j, f"field {name!r}: {reason}")
                    found = 0
                named.append(found)
            return np.asarray(named, dtype).reshape(n)
        types = set(map(type, column))
        fits = types <= ({int, bool} if classes is not None else {int, float})
        if not fits:
            fixed = []
            for j, value in enumerate(column):
                kind = type(value)
                if kind is int or kind is bool or (classes is None and kind is float):
                    fixed.append(value)
                    continue
                want = "an integer class id" if classes is not None else "a number"
                reason = "missing" if value is None else f"expected {want}, got {shown(value)}"
                bad.setdefault(j, f"field {name!r}: {reason}")
                fixed.append(0)
            column = fixed
        if classes is None:
            try:
                numbers = np.asarray(column, np.float64)
            except OverflowError:
                numbers = np.asarray([self._float_or_nan(v) for v in column], np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                targets = numbers.astype(np.float32).reshape(n)
            for row in np.flatnonzero(~np.isfinite(targets)):
                bad.setdefault(int(row), f"field {name!r}: non-finite: regression target {shown(column[int(row)])}")
            return targets
        try:
            ids_seen = np.asarray(column, np.int64).reshape(n)
        except OverflowError:  # beyond int64: out of range, whatever the class count
            ids_seen = np.asarray([v if -(2**62) < v < 2**62 else -1 for v in column], np.int64).reshape(n)
        for row in np.flatnonzero((ids_seen < 0) | (ids_seen >= classes)):
            bad.setdefault(int(row), f"field {name!r}: label out of range: {column[int(row)]} not in [0, {classes})")
        return ids_seen.astype(np.int32)

    def _texts(self, name: str | None, columns: dict, n: int, bad: dict[int, str]) -> list:
        """The key or segment field's values (None where absent): strings, integers as text."""
        if name is None:
            return [None] * n
        out: list = []
        for j, value in enumerate(columns[name]):
            if value is None:
                out.append(None)
                continue
            text = _as_text(value)
            if text is None:
                bad.setdefault(j, f"field {name!r}: expected a string, got {type(value).__name__}")
            out.append(text)
        if name == self.fields.key:
            return [None if text is None else text.encode("utf-8") for text in out]
        return out
