"""A test's own wire format for what the built-in codecs do not carry yet: named features and label arrays.

The training loop reads any `Codec`; this one is JSON, one example per record:
    {"x": {"tokens": [3, 1, 4], "numeric": [0.5, ...]} or [0.5, ...], "y": 2 or [0, 1, 1], "segment": "a"}
and decodes to blocks whose features are a dict of arrays in their declared dtypes (token
ids stay int32) and whose labels have the task's shape. It is not a test itself; the
binary and JSON formats for these (issue 12's wire-format part) will replace it.

Synthetic streams for it are `Scenario`s whose segments hold a NumPy structured array
(one field per named feature), so `ScenarioSource` can index one example at a time.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from continuity.stream import Codec, DeadLetter, ExampleBlock, FeatureSpec
from continuity.stream.records import PartitionRecords


class NamedFeaturesCodec(Codec):
    """JSON examples with `features` (a jax.ShapeDtypeStruct, or a dict of them) and `labels` (likewise)."""

    name = "json"

    def __init__(self, features, labels: jax.ShapeDtypeStruct):
        super().__init__(FeatureSpec((1,), "float32", None))  # unused: the batcher sizes batches from the blocks
        self.features, self.labels = features, labels

    def encode(self, x, y, *, segment=None, key=None) -> bytes:
        if isinstance(self.features, dict):
            x = {name: np.asarray(x[name]).tolist() for name in self.features}
        else:
            x = np.asarray(x).tolist()
        document = {"x": x, "y": np.asarray(y).tolist(), "segment": segment}
        return json.dumps(document).encode()

    def _features(self, rows: list) -> object:
        if isinstance(self.features, dict):
            return {
                name: np.asarray([row[name] for row in rows], spec.dtype).reshape(len(rows), *spec.shape)
                for name, spec in self.features.items()
            }
        spec = self.features
        return np.asarray(rows, spec.dtype).reshape(len(rows), *spec.shape)

    def decode(self, records: PartitionRecords) -> tuple[ExampleBlock, list[DeadLetter]]:
        rows, labels, segments, kept = [], [], [], []
        letters = []
        for i, value in enumerate(records.values):
            try:
                document = json.loads(value)
                rows.append(document["x"])
                labels.append(document["y"])
                segments.append(document.get("segment"))
                kept.append(i)
            except (ValueError, KeyError, TypeError) as error:
                letters.append(DeadLetter(records.record(i), f"bad record: {error}"))
        n = len(kept)
        block = ExampleBlock(
            records.topic,
            records.partition,
            self._features(rows),
            np.asarray(labels, self.labels.dtype).reshape(n, *self.labels.shape),
            np.arange(n, dtype=np.int32),
            np.zeros(n, np.int32),
            records.offsets[np.asarray(kept, np.int64)],
            np.ones(n, np.int32),
            segments,
            [records.keys[i] for i in kept],
        )
        return block, letters


def structured(features: dict[str, np.ndarray]) -> np.ndarray:
    """Named feature arrays (examples on axis 0) as one structured array, a field per feature."""
    n = len(next(iter(features.values())))
    dtype = np.dtype([(name, array.dtype, array.shape[1:]) for name, array in features.items()])
    out = np.zeros(n, dtype)
    for name, array in features.items():
        out[name] = array
    return out


def unstructured(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The dict of feature arrays a structured array holds (what the learner takes)."""
    assert rows.dtype.names is not None
    return {name: np.ascontiguousarray(rows[name]) for name in rows.dtype.names}
