"""The continuity probe: held-out examples, per segment, that the model is never trained on.

The batcher diverts a deterministic share of the stream here. Each segment keeps a
bounded reservoir (Vitter 1985, algorithm R), so an old segment stays represented
however long the stream runs, and memory is capped at `segments x per_segment`
examples. An optional golden probe (a fixed, curated file) is a segment of its own.

Reservoir decisions use a hash of (seed, segment, arrival number) instead of a random
generator, so a probe rebuilt by re-reading the same records after a restart is
identical, and the store is restored from a checkpoint as plain arrays.

An example's features are one array or a dict (any PyTree) of named arrays, each kept in
its own dtype; a label has the task's shape and dtype.

Threading: NOT thread-safe; the service loop owns it.
"""

from __future__ import annotations

import functools
import logging
import threading
import zlib
from pathlib import Path

import jax
import numpy as np

from continuity.config import ProbeConfig as ProbeConfig  # [probe]: declared with the config
from continuity.learner.learner import feature_rows

log = logging.getLogger(__name__)

GOLDEN_SEGMENT = "golden"


_serial_lock = threading.Lock()
_next_serial = 1


def _new_serials(n: int) -> np.ndarray:
    """`n` numbers never handed out before in this process: one per example written to a slot."""
    global _next_serial
    with _serial_lock:
        start, _next_serial = _next_serial, _next_serial + n
    return np.arange(start, start + n, dtype=np.int64)


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele et al. 2014) on uint64; a stateless, stable hash."""
    with np.errstate(over="ignore"):
        h = values.astype(np.uint64)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _tree(f, *trees, is_leaf=None):
    """`f` over the leaves of one or more feature trees (an array, or a dict of arrays); one array
    without a walk of the tree (the probe takes rows every batch: a walk costs more than the rows)."""
    if not isinstance(trees[0], dict):
        return f(*trees)
    return jax.tree.map(f, *trees, is_leaf=is_leaf)


class ProbeStore:
    """Per-segment reservoirs of held-out (x, y), addressed by segment name.

    `inputs`: one example's features, a jax.ShapeDtypeStruct (anything with shape and
    dtype) or a dict of them; `labels`: one example's label, likewise (Task.labels).
    The label's dtype is saved with the store's metadata, so a restored store keeps it.
    """

    def __init__(
        self,
        inputs,
        labels,
        *,
        per_segment: int = 200,
        max_segments: int = 64,
        window_examples: int = 5_000,
        seed: int = 0,
    ):
        self.inputs = _tree(_spec, inputs, is_leaf=_is_spec)
        self.labels = _spec(labels)
        self.per_segment = per_segment
        self.max_segments = max_segments
        self.window_examples = window_examples
        self.unsegmented_seen = 0  # held-out examples without a segment: they form windows
        self.seed = seed
        self._x: dict[str, object] = {}  # segment -> features, each [per_segment, *shape] in its dtype
        self._y: dict[str, np.ndarray] = {}  # segment -> [per_segment, *label_shape]
        self._seen: dict[str, int] = {}  # segment -> examples offered so far
        # segment -> [per_segment] int64: a process-wide unique number per example written, so a
        # model's results on the probe can be cached by row (the guard's) and reused while the
        # example stays; 0 for an empty slot. Not saved: a restored store numbers its rows anew.
        self._serial: dict[str, np.ndarray] = {}
        self._fixed: set[str] = set()  # golden segments: never replaced, never evicted

    @property
    def label_dtype(self) -> np.dtype:
        return np.dtype(self.labels.dtype)

    def _zeros(self, rows: int) -> tuple:
        x = _tree(lambda spec: np.zeros((rows, *spec.shape), spec.dtype), self.inputs)
        return x, np.zeros((rows, *self.labels.shape), self.labels.dtype)

    # ---- filling -------------------------------------------------------------------------

    def add(self, segment: str, x: np.ndarray, y: np.ndarray) -> None:
        """Offer held-out examples of one segment (algorithm R, one example at a time)."""
        if segment in self._fixed:
            raise ValueError(f"segment {segment!r} is the golden probe; stream examples cannot join it.")
        if segment not in self._x:
            self._open(segment)
        seen = self._seen[segment]
        n = len(y)
        winners: slice | np.ndarray  # the rows of (x, y) written, in the order of `slots[winners]`
        if seen + n <= self.per_segment:  # still filling: arrival i goes to slot i, each kept
            slots = np.arange(seen, seen + n)
            winners = slice(None)
        else:
            arrivals = np.arange(seen, seen + n, dtype=np.uint64)
            # slot for arrival i (0-based): i while the reservoir fills, else hash mod (i + 1).
            draws = _mix(arrivals ^ _salt(self.seed, segment)) % (arrivals + np.uint64(1))
            slots = np.where(arrivals < self.per_segment, arrivals, draws).astype(np.int64)
            kept = np.flatnonzero(slots < self.per_segment)
            if len(kept) > 1:
                # Later arrivals overwrite earlier ones in the same slot, as sequential algorithm R
                # would: of each slot's arrivals only the last is written (one vectorised scatter).
                kept = kept[::-1]
                _, last = np.unique(slots[kept], return_index=True)
                kept = kept[last]
            winners = kept
        targets = slots[winners]
        if len(targets):  # past the fill most arrivals are not kept: nothing to write

            def write(stored, given):
                stored[targets] = np.asarray(given)[winners]

            _tree(write, self._x[segment], x)
            self._y[segment][targets] = np.asarray(y)[winners]
            self._serial[segment][targets] = _new_serials(len(targets))
        self._seen[segment] = seen + n

    def add_unsegmented(self, x: np.ndarray, y: np.ndarray) -> None:
        """Examples whose records carry no segment: consecutive windows of `window_examples` held-out examples.

        Numbered by this store's own count, which checkpoints keep, so a restart re-reading
        the same records puts every example in the same window.
        """
        start = 0
        while start < len(y):
            window, used = divmod(self.unsegmented_seen, self.window_examples)
            take = min(len(y) - start, self.window_examples - used)
            part = slice(start, start + take)
            self.add(f"window-{window}", feature_rows(x, part), y[part])
            self.unsegmented_seen += take
            start += take

    def add_golden(self, x: np.ndarray, y: np.ndarray, name: str = GOLDEN_SEGMENT) -> None:
        """A fixed probe segment, kept whole, never replaced or evicted."""
        rows = len(y)
        self._x[name] = _tree(lambda a, spec: np.array(a, spec.dtype).reshape(rows, *spec.shape), x, self.inputs)
        self._y[name] = np.array(y, self.labels.dtype).reshape(rows, *self.labels.shape)
        self._seen[name] = len(y)
        self._serial[name] = _new_serials(len(y))
        self._fixed.add(name)

    def _open(self, segment: str) -> None:
        streaming = [s for s in self._x if s not in self._fixed]
        if len(streaming) >= self.max_segments:
            oldest = streaming[0]
            # Routine for window segments (a stream without segment fields opens one every
            # `window_examples` held-out examples); worth a warning for named ones.
            level = logging.INFO if oldest.startswith("window-") else logging.WARNING
            log.log(level, "probe: more than %d segments; dropping the oldest, %r", self.max_segments, oldest)
            for table in (self._x, self._y, self._seen, self._serial):
                del table[oldest]
        self._x[segment], self._y[segment] = self._zeros(self.per_segment)
        self._seen[segment] = 0
        self._serial[segment] = np.zeros((self.per_segment,), np.int64)

    # ---- reading -------------------------------------------------------------------------

    @property
    def segments(self) -> list[str]:
        return list(self._x)

    def __len__(self) -> int:
        return sum(self._count(s) for s in self._x)

    def _count(self, segment: str) -> int:
        return min(self._seen[segment], len(self._y[segment]))

    def examples(self) -> tuple:
        """All held examples: x (an array, or a dict of arrays), y and the index into `segments` of each row."""
        names = self.segments
        if not names:
            return (*self._zeros(0), np.zeros(0, np.int32))
        xs = [feature_rows(self._x[s], slice(0, self._count(s))) for s in names]
        ys = [self._y[s][: self._count(s)] for s in names]
        ids = [np.full(self._count(s), i, np.int32) for i, s in enumerate(names)]
        return _tree(lambda *parts: np.concatenate(parts), *xs), np.concatenate(ys), np.concatenate(ids)

    def serials(self) -> np.ndarray:
        """Each row of `examples()`'s unique number: equal numbers mean the same example."""
        names = self.segments
        if not names:
            return np.zeros(0, np.int64)
        return np.concatenate([self._serial[s][: self._count(s)] for s in names])

    # ---- checkpointing -------------------------------------------------------------------

    def to_arrays(self) -> tuple[dict, dict]:
        """(arrays for the checkpoint's probe item, JSON-able description for its metadata)."""
        arrays = {f"s{i}": {"x": self._x[s], "y": self._y[s]} for i, s in enumerate(self.segments)}
        meta = {
            "segments": self.segments,
            "seen": [self._seen[s] for s in self.segments],
            "fixed": sorted(self._fixed),
            "per_segment": self.per_segment,
            "seed": self.seed,
            "window_examples": self.window_examples,
            "unsegmented_seen": self.unsegmented_seen,
            "label_dtype": self.label_dtype.name,
        }
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict, inputs, labels, *, max_segments: int = 64) -> ProbeStore:
        """The store `to_arrays` described, for examples like `inputs` with labels like `labels`."""
        store = cls(
            inputs,
            labels,
            per_segment=meta["per_segment"],
            max_segments=max_segments,
            seed=meta["seed"],
            window_examples=meta["window_examples"],
        )
        store.unsegmented_seen = int(meta["unsegmented_seen"])
        for i, (segment, seen) in enumerate(zip(meta["segments"], meta["seen"])):
            item = arrays[f"s{i}"]
            store._x[segment] = _tree(lambda a, spec: np.array(a, spec.dtype), item["x"], store.inputs)
            store._y[segment] = np.array(item["y"], store.labels.dtype)
            store._seen[segment] = int(seen)
            store._serial[segment] = _new_serials(len(store._y[segment]))
        store._fixed = set(meta.get("fixed", ()))
        return store

    def copy(self) -> ProbeStore:
        """An independent store with the same examples, under the same serial numbers."""
        twin = ProbeStore(
            self.inputs,
            self.labels,
            per_segment=self.per_segment,
            max_segments=self.max_segments,
            window_examples=self.window_examples,
            seed=self.seed,
        )
        twin.unsegmented_seen = self.unsegmented_seen
        for table, source in ((twin._x, self._x), (twin._y, self._y), (twin._serial, self._serial)):
            table.update((segment, _tree(np.copy, array)) for segment, array in source.items())
        twin._seen, twin._fixed = dict(self._seen), set(self._fixed)
        return twin


def _is_spec(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _spec(value) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(value.shape), np.dtype(value.dtype))


def load_golden(path: str | Path) -> tuple:
    """A golden probe file: .npz with arrays `x` and `y`, or, for named features, `x.<name>`
    for each feature and `y`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"golden probe file {str(path)!r} does not exist.")
    try:
        data = np.load(path)  # allow_pickle=False: a file of objects is refused, never run
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"golden probe file {str(path)!r} is not a .npz of arrays ({error})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"golden probe file {str(path)!r} is a single .npy array, not a .npz holding 'x' and 'y'")
    with data:
        named = {key[2:]: data[key] for key in data if key.startswith("x.")}
        if ("x" not in data and not named) or "y" not in data:
            raise ValueError(
                f"golden probe file {str(path)!r} must hold arrays 'x' (or 'x.<name>' per named feature) "
                f"and 'y'; it has {sorted(data)}."
            )
        return (named or data["x"]), data["y"]


@functools.lru_cache(maxsize=1024)
def _salt(seed: int, segment: str) -> np.uint64:
    """The hash salt of one segment's reservoir draws (asked for every batch a segment gets)."""
    return np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64) ^ np.uint64(zlib.crc32(segment.encode("utf-8")))
