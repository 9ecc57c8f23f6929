"""What a broken upstream does to a stream: the damage the guard must stop, injected into a Scenario.

Each kind is one way real pipelines break:

- label damage on inputs the model already knows (drawn like an earlier segment, the
  `source`): `shuffle` (labels permuted across the span: a labeler mixed up its rows),
  `constant` (every label one class), `permute` (y -> (y + 1) mod K: a systematic
  mapping bug), `one-class` (only one class's examples arrive, correctly labelled: a
  filter upstream dropped the rest);
- feature damage, labels true: `scale` (features x 255: a unit bug, raw bytes instead of
  [0, 1]), `zero` (every feature 0), `freeze` (every feature stuck at its value in the
  span's first example: a stale reading sent again and again);
- `repeat`: one record (features and label) sent thousands of times.

Corrupted labels on *new* inputs are left out on purpose: they look like ordinary drift
to any probe, and no rule can tell them from it.

A damaged span is placed two ways. `segment`: it replaces segment `at` whole, under its
own segment name (`<source name>-<kind>`), so the probe holds its rows apart, as today's
`poison=k` does. `burst`: `burst_examples` damaged examples are inserted in the middle
of segment `at` under that segment's name: the segment stays, its probe reservoir
receives the damaged rows too, and the span straddles windows as a real outage would.
Either way the damaged examples are marked (`Segment.damaged`) so a benchmark can count
how many were trained, and every test split keeps the true labels.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from continuity.stream.scenarios import Scenario, Segment

DAMAGE_KINDS = ("shuffle", "constant", "permute", "scale", "zero", "freeze", "repeat", "one-class")
LABEL_DAMAGE = ("shuffle", "constant", "permute", "one-class")  # on inputs the model knows; features true
PLACEMENTS = ("segment", "burst")
SCALE = 255.0  # `scale`: the unit bug of features sent as bytes instead of [0, 1]
DEFAULT_BURST_EXAMPLES = 1500  # a burst outlasts one window of 1,000 (the digits' cadence)

_DAMAGE_STREAM = 0x44414D  # keys the damage's random stream apart from the scenario's own


def damage_scenario(
    scenario: Scenario,
    kind: str,
    *,
    at: int,
    source: int = 0,
    placement: str = "segment",
    burst_examples: int = DEFAULT_BURST_EXAMPLES,
) -> Scenario:
    """`scenario` with damage of `kind` at segment `at`, built from segment `source`'s train examples.

    The damaged span's examples are segment `source`'s, in a seeded order (repeated when
    the span is longer), then damaged as `kind` says (module docstring). `placement`
    "segment" replaces segment `at` by a span of its length; "burst" inserts
    `burst_examples` damaged examples in the middle of segment `at`. Same arguments,
    same arrays. Raises ValueError naming the option, what is allowed and the value received.
    """
    if kind not in DAMAGE_KINDS:
        raise ValueError(f"damage kind must be one of {_listing(DAMAGE_KINDS)}. Got {kind!r}.")
    if placement not in PLACEMENTS:
        raise ValueError(f"damage placement must be one of {_listing(PLACEMENTS)}. Got {placement!r}.")
    if scenario.num_classes is None:
        raise ValueError(f"damage needs a classification scenario (class labels); {scenario.name!r} has targets.")
    count = len(scenario.segments)
    if not _is_int(at) or not 0 <= at < count:
        raise ValueError(f"damage `at` must be a segment index in [0, {count - 1}]. Got {at!r}.")
    if not _is_int(source) or not 0 <= source < count:
        raise ValueError(f"damage `source` must be a segment index in [0, {count - 1}]. Got {source!r}.")
    if placement == "segment" and source >= at:
        raise ValueError(
            f"damage `source` must be a segment before `at`={at} (its inputs must be known). Got {source!r}."
        )
    if placement == "burst" and source > at:
        raise ValueError(f"damage `source` must be `at`={at} or an earlier segment. Got {source!r}.")
    if not _is_int(burst_examples) or burst_examples < 1:
        raise ValueError(f"damage `burst_examples` must be an integer >= 1. Got {burst_examples!r}.")

    rng = np.random.default_rng([scenario.seed, _DAMAGE_STREAM, DAMAGE_KINDS.index(kind), at])
    original = scenario.segments[at]
    length = len(original.train_y) if placement == "segment" else int(burst_examples)
    x, y = damaged_examples(scenario.segments[source], kind, length, scenario.num_classes, rng)
    segments = list(scenario.segments)
    if placement == "segment":
        segments[at] = Segment(
            name=f"{scenario.segments[source].name}-{kind}",
            train_x=_read_only(x),
            train_y=_read_only(y),
            test_x=original.test_x,
            test_y=original.test_y,
            poisoned=True,
            test_index=original.test_index,
            damaged=_read_only(np.ones(length, bool)),
        )
    else:
        middle = len(original.train_y) // 2
        damaged = np.zeros(len(original.train_y) + length, bool)
        damaged[middle : middle + length] = True
        segments[at] = replace(
            original,
            train_x=_read_only(np.concatenate([original.train_x[:middle], x, original.train_x[middle:]])),
            train_y=_read_only(np.concatenate([original.train_y[:middle], y, original.train_y[middle:]])),
            train_index=None,
            damaged=_read_only(damaged),
        )
    return replace(scenario, segments=tuple(segments))


def damaged_examples(
    source: Segment, kind: str, length: int, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`length` examples drawn from `source`'s train split (seeded order, cycled) with `kind`'s damage."""
    x, y = np.asarray(source.train_x), np.asarray(source.train_y)
    if kind == "one-class":  # only one class arrives; its labels are right
        chosen = rng.choice(np.unique(y))
        x, y = x[y == chosen], y[y == chosen]
    order = np.resize(rng.permutation(len(y)), length)  # cycled when the span is longer than the source
    x, y = x[order].astype(np.float32), y[order].astype(np.int32)
    if kind == "shuffle":
        y = rng.permutation(y).astype(np.int32)
    elif kind == "constant":
        y = np.full(length, rng.integers(num_classes), np.int32)
    elif kind == "permute":
        y = ((y + 1) % num_classes).astype(np.int32)
    elif kind == "scale":
        x = x * np.float32(SCALE)
    elif kind == "zero":
        x = np.zeros_like(x)
    elif kind == "freeze":
        x = np.broadcast_to(x[:1], x.shape).copy()
    elif kind == "repeat":
        x, y = np.broadcast_to(x[:1], x.shape).copy(), np.full(length, y[0], np.int32)
    return np.ascontiguousarray(x), y


def _listing(values) -> str:
    return ", ".join(repr(v) for v in values)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
