"""Synthetic continual-learning scenarios built from scikit-learn's bundled digits.

A scenario is a fixed sequence of segments (the tasks a continual learner meets one
after another), each with its own train stream and held-out test split. The data ships
inside scikit-learn (`load_digits`: 1797 8x8 images, 10 classes), so nothing is
downloaded at run time and every scenario is a pure function of its arguments.

- permuted-digits: domain-incremental; segment k applies a fixed pixel permutation
  (segment 0 is the identity). Goodfellow et al. (2013) introduced permuted MNIST.
- rotated-digits: domain-incremental; segment k rotates every image by k * 180 / T degrees.
- split-digits: class-incremental; segment k holds only the digits 2k and 2k + 1,
  labelled with the original digit (one 10-way head), as in split MNIST
  (Zenke et al. 2017).

One stratified train/test split of the base images is drawn per seed and shared by all
segments, so no test image is ever trained on in any segment: a test accuracy on an
old segment measures retention, not memorisation.

- drifting-regression: regression targets (num_classes None, float32 labels) generated
  from the seed, no data set: 8 features, y = sin(2 w.x) + a.x + small noise with w, a
  fixed by the seed. Segment k draws its inputs around its own centre (covariate
  drift): a model must keep fitting every region it has seen.

`poison=k` replaces segment k by the failure the guard exists to catch: a broken
upstream labeler. Its inputs come from a distribution the
model already knows (segment `poison_source`'s transform and classes), its train labels
are corrupted, and its test split keeps the true labels. Corrupted labels on a new
distribution look like ordinary drift to any probe; on a known one they do damage a
guard must stop. For drifting-regression the labeler's targets are corrupted instead:
"shuffle" permutes them across the segment, "flip" negates them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SCENARIOS = ("permuted-digits", "rotated-digits", "split-digits")  # classification, from the digits
REGRESSION_SCENARIOS = ("drifting-regression",)  # float targets, generated from the seed
POISON_MODES = ("shuffle", "flip")

NUM_CLASSES = 10
# How often a guard judges these scenarios: their segments last ~1,400 training examples,
# so windows of 1,000 examples judge every segment at least once. The service's default
# (`probe.every_examples`, 50,000) is for streams that drift over far more examples.
GUARD_EVERY_EXAMPLES = 1000
IMAGE_SIZE = 8
EXAMPLE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
_DEFAULT_SEGMENTS = {"permuted-digits": 10, "rotated-digits": 5, "split-digits": 5, "drifting-regression": 4}
REGRESSION_FEATURES = 8
REGRESSION_EXAMPLES = 1000  # per segment, before the test split
_REGRESSION_SPREAD = 0.6  # standard deviation of a segment's inputs around its centre
_REGRESSION_DISTANCE = 2.5  # how far each segment's centre lies from the origin
_REGRESSION_NOISE = 0.05  # standard deviation of the observation noise on the targets

# Independent random streams, one per purpose, each keyed by (seed, purpose, segment):
# a segment's permutation or order never depends on how many segments were asked for
# or whether another segment is poisoned.
_SPLIT, _PERMUTATION, _ORDER, _POISON = range(4)


# eq=False: the fields are arrays, for which a generated __eq__ / __hash__ would raise.
@dataclass(frozen=True, eq=False)
class Segment:
    """One task of a scenario: a train stream (in arrival order) and its held-out test split.

    The arrays are read-only: a scenario is shared data, and a consumer that normalised
    it in place would silently change every later use.
    """

    name: str  # e.g. "perm-3", "rot-72", "classes-4-5", "region-2"; a poisoned one ends in "-poisoned"
    train_x: np.ndarray  # float32, shape=(N, 8, 8, 1), values in [0, 1] (pixels / 16); regression: (N, 8)
    train_y: np.ndarray  # int32, shape=(N,): the labels trained on (corrupted when poisoned); regression: float32
    test_x: np.ndarray  # float32, shape=(M, 8, 8, 1); regression: (M, 8)
    test_y: np.ndarray  # int32 (regression: float32), shape=(M,): always the true labels
    poisoned: bool = False
    train_index: np.ndarray | None = None  # int64, shape=(N,): load_digits() row of each train example
    test_index: np.ndarray | None = None  # int64, shape=(M,): load_digits() row of each test example
    damaged: np.ndarray | None = None  # bool, shape=(N,): train examples a damage injection corrupted (stream.damage)


@dataclass(frozen=True)
class Scenario:
    """A named sequence of segments over one shared train/test split of the digits."""

    name: str  # one of SCENARIOS or REGRESSION_SCENARIOS
    segments: tuple[Segment, ...]
    num_classes: int | None  # 10 for the digits scenarios; None for regression targets
    example_shape: tuple[int, ...]  # (8, 8, 1)
    seed: int


@dataclass(frozen=True)
class _Distribution:
    """How a segment's inputs are drawn: a name, a pixel transform and the classes kept."""

    name: str
    transform: Callable[[np.ndarray], np.ndarray]  # (N, 8, 8) float32 -> (N, 8, 8) float32
    classes: tuple[int, ...] | None  # None: all ten digits


def make_scenario(
    name: str,
    *,
    seed: int = 0,
    segments: int | None = None,
    poison: int | None = None,
    poison_mode: str = "shuffle",
    poison_source: int = 0,
    test_fraction: float = 0.2,
) -> Scenario:
    """Build the scenario `name` (one of SCENARIOS or REGRESSION_SCENARIOS); the same arguments
    give identical arrays.

    segments: how many segments (default 10 for permuted, 5 for rotated; split-digits has
        exactly 5, one per digit pair, so it accepts only None or 5).
    poison: index k (1 <= k < segments) of a segment to replace by a broken-labeler
        segment drawn like segment `poison_source` (< k), with train labels corrupted by
        `poison_mode`: "shuffle" permutes the labels across its train examples; "flip"
        maps each label to the next one of the segment's sorted label set, so every
        train label is wrong.
    test_fraction: share of each class held out for the test splits, in (0, 1).

    Raises ValueError naming the option, what is allowed and the value received.
    """
    count = _check_arguments(name, seed, segments, poison, poison_mode, poison_source, test_fraction)
    if name in REGRESSION_SCENARIOS:
        return _regression_scenario(name, seed, count, poison, poison_mode, poison_source, test_fraction)
    images, labels = _digits()
    train_index, test_index = _stratified_split(labels, seed, test_fraction)
    distributions = _distributions(name, seed, count)
    built = []
    for k, distribution in enumerate(distributions):
        if k == poison:
            segment = _segment(
                distribution=distributions[poison_source],
                order_rng=_rng(seed, _ORDER, k),
                images=images,
                labels=labels,
                train_index=train_index,
                test_index=test_index,
            )
            corrupted = _corrupt(segment.train_y, poison_mode, _rng(seed, _POISON, k))
            segment = Segment(
                name=f"{segment.name}-poisoned",
                train_x=segment.train_x,
                train_y=_read_only(corrupted),
                test_x=segment.test_x,
                test_y=segment.test_y,
                poisoned=True,
                train_index=segment.train_index,
                test_index=segment.test_index,
            )
        else:
            segment = _segment(
                distribution=distribution,
                order_rng=_rng(seed, _ORDER, k),
                images=images,
                labels=labels,
                train_index=train_index,
                test_index=test_index,
            )
        built.append(segment)
    return Scenario(name=name, segments=tuple(built), num_classes=NUM_CLASSES, example_shape=EXAMPLE_SHAPE, seed=seed)


def _check_arguments(name, seed, segments, poison, poison_mode, poison_source, test_fraction) -> int:
    """Validate make_scenario's options; return the number of segments."""
    if name not in SCENARIOS + REGRESSION_SCENARIOS:
        raise ValueError(f"scenario must be one of {_listing(SCENARIOS + REGRESSION_SCENARIOS)}. Got {name!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer. Got {seed!r}.")
    if name == "split-digits":
        if segments is not None and (not _is_int(segments) or segments != 5):
            raise ValueError(f"segments for 'split-digits' must be None or 5 (one per digit pair). Got {segments!r}.")
    elif segments is not None and (not _is_int(segments) or segments < 1):
        raise ValueError(f"segments for {name!r} must be None or an integer >= 1. Got {segments!r}.")
    count = _DEFAULT_SEGMENTS[name] if segments is None else segments
    if poison_mode not in POISON_MODES:
        raise ValueError(f"poison_mode must be one of {_listing(POISON_MODES)}. Got {poison_mode!r}.")
    if not _is_int(poison_source) or poison_source < 0:
        raise ValueError(f"poison_source must be a non-negative integer. Got {poison_source!r}.")
    if poison is not None:
        if count < 2:
            raise ValueError(
                f"poison needs at least 2 segments (segment 0 is never poisoned); "
                f"{name!r} has {count}. Got poison={poison!r}."
            )
        if not _is_int(poison) or not 1 <= poison < count:
            raise ValueError(
                f"poison must be None or a segment index in [1, {count - 1}] for {name!r} "
                f"with {count} segments. Got {poison!r}."
            )
        if poison_source >= poison:
            raise ValueError(
                f"poison_source must be an earlier segment than poison={poison}, in [0, {poison - 1}]. "
                f"Got {poison_source!r}."
            )
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in the open interval (0, 1). Got {test_fraction!r}.")
    return count


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _listing(values) -> str:
    return ", ".join(repr(v) for v in values)


def _rng(seed: int, purpose: int, segment: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, segment])


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 base images scaled to [0, 1] (float32, (N, 8, 8)) and their labels (int32).

    Cached: tests and benchmarks build many scenarios, and load_digits parses a CSV each
    call. The arrays are read-only so the cache cannot be corrupted by a caller.
    """
    from sklearn.datasets import load_digits  # heavy import, paid only when a scenario is built

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixels are counts 0..16
    return _read_only(images), _read_only(digits.target.astype(np.int32))


def _stratified_split(labels: np.ndarray, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted base indices (train, test): `test_fraction` of each class held out.

    Each class keeps at least one image on each side, so every segment of every scenario
    has train and test examples of all its classes.
    """
    rng = _rng(seed, _SPLIT)
    train, test = [], []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        held_out = int(np.clip(round(test_fraction * members.size), 1, members.size - 1))
        test.append(members[:held_out])
        train.append(members[held_out:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _distributions(name: str, seed: int, count: int) -> list[_Distribution]:
    """The input distribution of each segment of scenario `name`."""
    if name == "permuted-digits":
        pixels = IMAGE_SIZE * IMAGE_SIZE
        return [
            _Distribution(
                f"perm-{k}",
                _permute(np.arange(pixels) if k == 0 else _rng(seed, _PERMUTATION, k).permutation(pixels)),
                None,
            )
            for k in range(count)
        ]
    if name == "rotated-digits":
        return [_Distribution(f"rot-{k * 180 / count:g}", _rotate(k * 180 / count), None) for k in range(count)]
    return [_Distribution(f"classes-{2 * k}-{2 * k + 1}", _identity, (2 * k, 2 * k + 1)) for k in range(count)]


def _identity(images: np.ndarray) -> np.ndarray:
    return images.copy()


def _permute(permutation: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def permute(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1)
        return flat[:, permutation].reshape(images.shape)

    return permute


def _rotate(angle: float) -> Callable[[np.ndarray], np.ndarray]:
    def rotate(images: np.ndarray) -> np.ndarray:
        if angle == 0:
            return images.copy()  # exactly the base images, not an interpolated copy
        from scipy.ndimage import rotate as ndimage_rotate

        rotated = ndimage_rotate(images, angle, axes=(1, 2), reshape=False, order=1)
        # Linear interpolation stays within [0, 1] up to rounding; clip that rounding.
        return np.clip(rotated, 0.0, 1.0).astype(np.float32)

    return rotate


def _segment(
    *,
    distribution: _Distribution,
    order_rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    train_index: np.ndarray,
    test_index: np.ndarray,
) -> Segment:
    """Draw one clean segment: train examples in a seeded order, test in base-index order."""
    if distribution.classes is not None:
        train_index = train_index[np.isin(labels[train_index], distribution.classes)]
        test_index = test_index[np.isin(labels[test_index], distribution.classes)]
    train_index = train_index[order_rng.permutation(train_index.size)]

    def inputs(index: np.ndarray) -> np.ndarray:
        x = distribution.transform(images[index])
        return _read_only(np.ascontiguousarray(x[..., None], dtype=np.float32))

    return Segment(
        name=distribution.name,
        train_x=inputs(train_index),
        train_y=_read_only(labels[train_index].copy()),
        test_x=inputs(test_index),
        test_y=_read_only(labels[test_index].copy()),
        train_index=_read_only(train_index.astype(np.int64)),
        test_index=_read_only(test_index.astype(np.int64)),
    )


def _corrupt(labels: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """A broken labeler's output for true `labels` (see make_scenario's `poison_mode`)."""
    if mode == "shuffle":
        return rng.permutation(labels).astype(np.int32)
    # "flip": a derangement of the segment's own label set, so no train label is right
    # and the labels stay plausible (a split segment's flipped labels are still its pair).
    label_set = np.unique(labels)
    if label_set.size < 2:
        raise ValueError(
            f"poison_mode 'flip' needs a segment with at least 2 classes to mislabel. Got {label_set.tolist()}."
        )
    lookup = np.zeros(NUM_CLASSES, np.int32)
    lookup[label_set] = np.roll(label_set, -1)
    return lookup[labels]


def _regression_scenario(name, seed, count, poison, poison_mode, poison_source, test_fraction) -> Scenario:
    """drifting-regression: one smooth target function, inputs drifting from region to region."""
    function_rng = _rng(seed, _PERMUTATION)  # the target function, shared by every segment
    w = function_rng.normal(size=REGRESSION_FEATURES) / np.sqrt(REGRESSION_FEATURES)
    a = function_rng.normal(size=REGRESSION_FEATURES) / np.sqrt(REGRESSION_FEATURES)
    tests = int(np.clip(round(test_fraction * REGRESSION_EXAMPLES), 1, REGRESSION_EXAMPLES - 1))

    def draw(region: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # A region's centre depends only on (seed, region), so a poisoned segment can reuse one.
        direction = _rng(seed, _SPLIT, region).normal(size=REGRESSION_FEATURES)
        centre = _REGRESSION_DISTANCE * direction / np.linalg.norm(direction)
        x = centre + _REGRESSION_SPREAD * rng.normal(size=(REGRESSION_EXAMPLES, REGRESSION_FEATURES))
        y = np.sin(2 * x @ w) + x @ a + _REGRESSION_NOISE * rng.normal(size=REGRESSION_EXAMPLES)
        return x.astype(np.float32), y.astype(np.float32)

    built = []
    for k in range(count):
        region = poison_source if k == poison else k
        x, y = draw(region, _rng(seed, _ORDER, k))
        train_y = y[tests:]
        if k == poison:
            train_y = _rng(seed, _POISON, k).permutation(train_y) if poison_mode == "shuffle" else -train_y
        built.append(
            Segment(
                name=f"region-{region}" + ("-poisoned" if k == poison else ""),
                train_x=_read_only(np.ascontiguousarray(x[tests:])),
                train_y=_read_only(np.ascontiguousarray(train_y, np.float32)),
                test_x=_read_only(np.ascontiguousarray(x[:tests])),
                test_y=_read_only(np.ascontiguousarray(y[:tests])),
                poisoned=k == poison,
            )
        )
    return Scenario(name=name, segments=tuple(built), num_classes=None, example_shape=(REGRESSION_FEATURES,), seed=seed)
